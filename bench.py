"""
The bench: step time, memory, cache throughput and gradient fidelity, side by side in one process,
and the tables of RESULTS.md.

  python bench.py [rskd.py options]   # writes OUT_DIR/bench.json
  python bench.py rounds [options]    # distinct ids per position for N = 1..255, fidelity at a few N
  python bench.py storage [options]   # compressed against plain caches at N = 12, 50, 150: size, speed
  python bench.py gpu                 # the prepared GPU check: CUDA tests, GPT-2-shaped runs -> gpu_check.json
  python bench.py tables              # RESULTS.md's tables, from the runs' metrics.jsonl (in this folder)
  python bench.py plots               # RESULTS.md's pictures, the same runs' (matplotlib: plots/*.png)

Every entry of rskd.FORMATS is benched: its caching speed, its reading cost, its training step and
its gradient against full KD's, so that a new format is measured with no edit here, and each format
is cached and read both compressed (the default) and plain ("rs plain": --compress false). Every method is
timed on the same batch, interleaved and rotated (A B C D E, B C D E A, ...), so slow drift of the
machine cancels out of the ratios. Each caching run comes right after a bare teacher forward over the
same batches, and the ratio is taken pair by pair.
"""
import contextlib
import copy
import functools
import glob
import io
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from types import SimpleNamespace

from guardrails import (cache_files, checked_json, die, entry_point, folder_lock, load_checkpoint, load_teacher,
                        output_folder, parse_args, read_cache_meta, read_json, recorded_options, resolve_config,
                        save_checkpoint, setup, write_json)  # first (before torch)
import numpy as np
import torch

import prepare_data
import rskd
from model import GPT, GPTConfig

TAILS = ('ghost', 'smooth', 'naive')  # Top-K with a remedy for its leftover mass


def step_methods():
    """What bench_steps times: cross-entropy, every cache format (with the loss it trains) read from its
    compressed and its plain cache, Top-K's remedies on the topk cache, and full KD."""
    return ['ce', *storages(), *(TAILS if 'topk' in rskd.FORMATS else ()), 'fullkd']


def storages(methods=None):
    """{'rs': ('rs', True), 'rs plain': ('rs', False), ...}: each format's caches, compressed or not."""
    return {name: (m, compress) for m in methods or rskd.FORMATS
            for name, compress in ((m, True), (f'{m} plain', False))}


def bench_split(cfg, env):
    """(tokens, S, V): the train split's first --max_seqs sequences (all: 0), at least one batch of them."""
    tokens, S, V = rskd.load_split(cfg, 'train', env, cfg.max_seqs)
    if cfg.batch_size > S:
        die(f"--batch_size {cfg.batch_size} is more than the {S} sequences of {cfg.block_size} tokens in the "
            f"data{' (--max_seqs)' if cfg.max_seqs else ''}: use a smaller one")
    return tokens, S, V


def run_bench(cfg, env):
    tokens, S, V = bench_split(cfg, env)
    T, B = cfg.block_size, cfg.batch_size
    # the gradient-fidelity student: OUT_DIR/ckpt.pt when there is one (trained, as in the paper)
    student_path = os.path.join(cfg.out_dir, 'ckpt.pt')
    ckpt = load_checkpoint(student_path) if os.path.exists(student_path) else None
    if ckpt and (ckpt['model_config']['vocab_size'] != V or ckpt['model_config']['block_size'] < T):
        die(f"{student_path} is a student for vocab {ckpt['model_config']['vocab_size']} and block_size "
            f"{ckpt['model_config']['block_size']}, this bench has {V} and {T}: use another --out_dir")
    teacher, info = load_teacher(cfg.teacher, V, T, env)  # once, for every run below
    os.makedirs(cfg.out_dir, exist_ok=True)
    n = min(S, 4 * B)  # the sequences that the caching runs cover
    caching = measured('caching', bench_caching, cfg, env, (teacher, info), tokens, n)
    student = fidelity_student(cfg, env, ckpt, V)
    seqs = list(range(B))
    idx, targets = rskd.get_batch(tokens, seqs, T, env)
    fidelity = measured('gradient fidelity', bench_fidelity, cfg, env, teacher, student, idx, seqs,
                        targets)
    steps = measured('training steps', bench_steps, cfg, env, teacher, student, tokens, n, idx,
                     targets, seqs, caching['dirs'])
    pipeline = measured('host pipeline', bench_pipeline, cfg, env, tokens, V)
    precision = measured('bf16 precision', bench_precision, teacher, idx, env)
    res = dict(device=env.name, dtype=env.dtype, compile=env.compile,
               model=dict(student=asdict(student.config), teacher=asdict(teacher.config), batch_size=B),
               **steps, **caching['result'], **fidelity, **pipeline, teacher_bf16=precision,
               fidelity_student=student_path if ckpt else 'random init')
    write_json(res, os.path.join(cfg.out_dir, 'bench.json'))
    report(res, cfg)


def quiet():
    """The inner runs' own lines (progress, summaries) go: the bench prints its measurements."""
    return contextlib.redirect_stdout(io.StringIO())


def measured(what, bench, *args, **kwargs):
    """bench(*args, **kwargs), and one line saying that it was measured and how long that took."""
    t0 = time.time()
    result = bench(*args, **kwargs)
    print(f"measured {what} in {time.time() - t0:.0f}s", flush=True)
    return result


def fidelity_student(cfg, env, ckpt, V):
    """The student whose gradients are compared: the trained one in OUT_DIR/ckpt.pt, else a new one."""
    torch.manual_seed(rskd.stream_seed(cfg.seed, rskd.INIT))
    if ckpt:
        student = GPT.from_checkpoint(ckpt)
    else:
        shape = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
        student = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=V, **shape))
    return student.to(env.device)


def bench_caching(cfg, env, loaded, tokens, n, methods=None):
    """--mode cache for every format, compressed and plain, against the bare teacher forward over the
    same n sequences, 5 pairs each; the sizes, and compressed against plain."""
    T, B = cfg.block_size, cfg.batch_size
    teacher = torch.compile(loaded[0]) if env.compile else loaded[0]  # as --mode cache runs it
    batches = [rskd.get_batch(tokens, range(i, min(i + B, n)), T, env, B)[0] for i in range(0, n, B)]  # (as cached: padded)

    @torch.no_grad()
    def bare_forward():
        t0 = time.time()
        for idx in batches:
            with env.ctx:
                teacher(idx, padded=True)  # (as --mode cache runs it)
        if env.device_type == 'cuda':
            torch.cuda.synchronize()
        return n * T / (time.time() - t0)
    bare_forward()  # warm-up
    variants = storages(methods)
    dirs = {name: os.path.join(cfg.out_dir, f"bench-cache-{name.replace(' ', '-')}") for name in variants}
    runs = dict(fwd=[], **{m: [] for m in dirs})  # tok/s of every run
    for _ in range(5):  # each cache run right after a bare forward: the pair's ratio cancels drift
        for name, d in dirs.items():
            runs['fwd'].append(bare_forward())
            shutil.rmtree(d, ignore_errors=True)
            method, compress = variants[name]
            run_cfg = replace(cfg, method=method, compress=compress, cache_dir=d, max_seqs=n, split='train',
                              commit_seconds=5.0)
            with quiet():  # (the run's own progress lines)
                runs[name].append(rskd.run_cache(run_cfg, env, loaded))
    speed = {k: float(np.median(v)) for k, v in runs.items()}
    per_fwd = {m: np.divide(runs[m], runs['fwd'][i::len(dirs)]) for i, m in enumerate(dirs)}
    sizes = {}  # bytes per stored entry (E in meta.json) and per position: all files, and those that grow
    for name, d in dirs.items():  # with the cache (not the compressed one's vocab_order, 2 bytes per token)
        meta = read_cache_meta(d, rskd.FORMATS)
        size = {f: os.path.getsize(os.path.join(d, f'{f}.bin')) for f in cache_files(meta, rskd.FORMATS)}
        grows = sum(size[f] for f, (_, per) in cache_files(meta, rskd.FORMATS).items() if per != 'vocab')
        sizes[name] = dict(per_entry=sum(size.values()) / meta['entries'], per_entry_growing=grows / meta['entries'],
                           per_position=grows / (n * cfg.block_size))
    result = dict(teacher_fwd_tok_s=speed['fwd'], cache_tok_s={m: speed[m] for m in dirs},
                  cache_ratio_vs_fwd={m: float(np.median(r)) for m, r in per_fwd.items()},
                  cache_runs_tok_s=runs, cache_bytes=sizes,
                  compressed_cache_speed_vs_plain={m: float(np.median(per_fwd[m] / per_fwd[f'{m} plain']))
                                                   for m, (_, compress) in variants.items() if compress})
    return dict(dirs=dirs, result=result)


def sparse_targets(method, probs, cfg, seqs, env):
    """(ids, w, unique ids per position) of a format's target on probs, as training reads them back."""
    fmt = rskd.FORMATS[method]
    B, T = probs.shape[:2]
    gens = rskd.seq_generators(cfg.seed, seqs, env.device)
    options = recorded_options(cfg, fmt)
    stored = fmt['target'](probs, options, gens)
    ids, w = fmt['decode'](stored, vars(options))
    if fmt['ragged']:
        ids, w = rskd.pad_rows(stored[fmt['ragged']], ids, w)
    unique = stored[fmt['ragged']].sum().item() / (B * T) if fmt['ragged'] else ids.shape[-1]  # (any fork's files)
    return ids.view(B, T, -1), w.view(B, T, -1), unique


def bench_fidelity(cfg, env, teacher, student, idx, seqs, labels, sweep=()):
    """Each sparse target's gradient against full KD's on one batch: w.r.t. the student's logits
    (where sampling noise is per position) and w.r.t. its weights (a sum over the batch's positions:
    independent noise averages out there, a bias does not). sweep: more rounds N to try, each with
    both samplers."""
    B, T = idx.shape
    with torch.no_grad(), env.ctx:
        t_logits = teacher(idx).float()
    probs = torch.softmax(t_logits, dim=-1)
    with env.ctx:
        s_logits = student(idx).float()  # one graph, reused by every variant
    params = list(student.parameters())

    def grads(loss):  # -> (d loss / d logits, d loss / d weights), each flattened
        g_logits, = torch.autograd.grad(loss, s_logits, retain_graph=True)
        g_params = torch.autograd.grad(s_logits, params, g_logits, retain_graph=True)
        return g_logits.flatten(), torch.cat([g.flatten() for g in g_params])

    def rs(rounds, sampler, method='rs', tau=1.0):  # -> (ids, weights, unique tokens per position)
        run_cfg = replace(cfg, rounds=rounds, sampler=sampler, proposal_temperature=tau)
        return sparse_targets(method, probs, run_cfg, seqs, env)
    # every format at the run's options, then the variants the paper and RESULTS.md discuss
    sparse = {m: sparse_targets(m, probs, cfg, seqs, env) for m in rskd.FORMATS}
    base = sparse['rs'][2] if 'rs' in sparse else cfg.rounds
    # the systematic rounds with multinomial's storage (unique ids grow with rounds): a bisection
    lo, hi = 1, cfg.rounds
    while lo < hi:
        mid = (lo + hi) // 2
        if rs(mid, 'systematic')[2] < base:
            lo = mid + 1
        else:
            hi = mid
    candidates = [r for r in (lo - 1, lo) if r >= 1]
    r_eq = min(candidates, key=lambda r: abs(rs(r, 'systematic')[2] - base))
    sparse.update({f'systematic{cfg.rounds}': rs(cfg.rounds, 'systematic'), f'systematic{r_eq}': rs(r_eq, 'systematic'),
                   'is0.8': rs(cfg.rounds, 'multinomial', 'is', 0.8), 'is1.2': rs(cfg.rounds, 'multinomial', 'is', 1.2)})
    for N in sweep:
        sparse.update({f'multinomial{N}': rs(N, 'multinomial'), f'systematic{N}': rs(N, 'systematic')})
    unique = {k: v[2] for k, v in sparse.items()}
    # each variant's loss is built when its turn comes, and its graph freed before the next one's
    variants = {k: functools.partial(rskd.OBJECTIVES[rskd.FORMATS[k]['loss'] if k in rskd.FORMATS else 'rskd'],
                                     s_logits, dict(ids=v[0], w=v[1], targets=labels)) for k, v in sparse.items()}
    top = probs.topk(50, dim=-1)
    variants['topk50'] = functools.partial(rskd.sparse_kd_loss, s_logits, top.indices, top.values)
    top = probs.topk(cfg.k, dim=-1)  # the paper's three remedies for Top-K's leftover mass
    batch = dict(ids=top.indices, w=top.values, targets=labels)
    for tail in TAILS:
        variants[tail] = functools.partial(rskd.OBJECTIVES[tail], s_logits, batch)
    full = grads(rskd.full_kd_loss(s_logits, t_logits))
    fidelity = {}
    for name, loss in variants.items():
        for wrt, g, g_full in zip(('logits', 'weights'), grads(loss()), full):
            cos = (g @ g_full / (g.norm() * g_full.norm())).clamp(-1, 1).item()
            fidelity.setdefault(f'grad_angle_deg_{wrt}', {})[name] = math.degrees(math.acos(cos))
            fidelity.setdefault(f'grad_norm_ratio_{wrt}', {})[name] = (g.norm() / g_full.norm()).item()
    return dict(grad_angle_deg=fidelity['grad_angle_deg_logits'],
                grad_norm_ratio=fidelity['grad_norm_ratio_logits'], **fidelity,
                unique_per_position=unique, systematic_equal_storage_rounds=r_eq)


@torch.no_grad()
def bench_precision(teacher, idx, env):
    """The teacher's probabilities under bfloat16 autocast, with the output layer in float32 (as rskd
    runs it) and in bfloat16 (as autocast alone would), each against float32 on the same batch."""
    exact = teacher  # a float32 copy when --dtype cast the teacher's blocks
    if any(p.dtype != torch.float32 for p in teacher.parameters()):
        exact = copy.deepcopy(teacher).float()
    t32 = torch.softmax(exact(idx).float(), -1)
    out, head = {}, teacher.float32_head
    for name, float32_head in (('float32 output layer', True), ('bfloat16 output layer', False)):
        teacher.float32_head = float32_head
        with torch.autocast(env.device_type, dtype=torch.bfloat16):
            t16 = torch.softmax(teacher(idx).float(), -1)
        big = t32 >= t32.max(-1, keepdim=True).values.clamp(max=1e-4)  # (the ones that matter)
        rel = ((t16 - t32).abs() / t32)[big]
        kl = (t32 * (torch.log(t32.clamp_min(1e-30)) - torch.log(t16.clamp_min(1e-30)))).sum(-1).mean()
        out[name] = dict(median_rel_error=rel.median().item(), max_rel_error=rel.max().item(),
                         kl_float32_to_bf16=kl.item(), max_abs_error=(t16 - t32).abs().max().item())
    teacher.float32_head = head
    return out


def bench_steps(cfg, env, teacher, student, tokens, n, idx, targets, seqs, dirs, methods=None, rotations=2):
    """One training step per method on the same batch, the methods interleaved and rotated: CE, each
    cache format (compressed and plain) with the loss it trains, Top-K's remedies and full KD."""
    B, T = idx.shape
    model = torch.compile(student) if env.compile else student
    teacher_c = torch.compile(teacher) if env.compile else teacher
    optimizer = student.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.95), env.device_type)
    vanilla = replace(cfg, topk_tail='none', alpha=0.0, max_seqs=n)
    V = student.config.vocab_size

    variants = {name: m for name, (m, _) in storages().items() if name in dirs}

    def reader(name, checked=True):
        run_cfg = replace(vanilla, cache_dir=dirs[name])
        loss = rskd.FORMATS[variants[name]]['loss']
        return rskd.open_cache(run_cfg, loss, tokens[:n * T + 1], V, env, checked)[1]
    readers = {name: reader(name) for name in variants}
    objectives = {name: rskd.FORMATS[m]['loss'] for name, m in variants.items()}
    for tail in TAILS if 'topk' in readers else ():
        readers[tail], objectives[tail] = readers['topk'], tail
    objectives.update(ce='ce', fullkd='fullkd')
    methods = methods or step_methods()
    times, mem = {k: [] for k in methods}, {k: 0 for k in methods}
    for rep in range(2 + rotations * len(methods)):  # every rotation timed `rotations` times, after 2 warm-ups
        for name in methods[rep % len(methods):] + methods[:rep % len(methods)]:
            base = peak_memory_reset(env)
            t0 = time.time()
            batch = dict(idx=idx, targets=targets)
            if name in readers:  # as in training: read per step
                batch['ids'], batch['w'] = readers[name](seqs)
            with env.ctx:
                logits = model(idx)
            if name == 'fullkd':
                with torch.no_grad(), env.ctx:
                    batch['teacher'] = teacher_c(idx)
            rskd.OBJECTIVES[objectives[name]](logits, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del logits, batch
            if env.device_type == 'cuda':
                torch.cuda.synchronize()
            if rep >= 2:
                times[name].append(time.time() - t0)
                mem[name] = max(mem[name], peak_memory(env) - base)
    step_ms = {k: 1000 * float(np.median(v)) for k, v in times.items()}
    host_ms = {}  # what training's fetch does per micro-batch: the tokens, the cache rows, their checks
    for method in [m for m in variants if m in methods]:
        samples = []
        for _ in range(10):
            t0 = time.time()
            rskd.get_batch(tokens, seqs, T, env)
            readers[method](seqs)
            samples.append(time.time() - t0)
        host_ms[method] = 1000 * float(np.median(samples))
    # what reading a batch's rows costs, with and without their checks (checksums, values), interleaved
    read_ms = {}
    for method in [m for m in variants if m in methods]:
        plain = reader(method, checked=False)
        samples = dict(checked=[], unchecked=[])
        for _ in range(20):
            for kind, read in (('checked', readers[method]), ('unchecked', plain)):
                t0 = time.time()
                read(seqs)
                samples[kind].append(time.time() - t0)
        read_ms[method] = {k: 1000 * float(np.median(v)) for k, v in samples.items()}
    check_share = {m: (r['checked'] - r['unchecked']) / step_ms[m] for m, r in read_ms.items()}
    vs_plain = {m: step_ms[m] / step_ms[f'{m} plain'] for m in step_ms if f'{m} plain' in step_ms}
    # what decoding adds, more precisely than the steps' ratio: the reads' difference, over a step
    decode_share = {m: (read_ms[m]['checked'] - read_ms[f'{m} plain']['checked']) / step_ms[f'{m} plain']
                    for m in vs_plain}
    kind = 'growth of CUDA max allocated during the step' if env.device_type == 'cuda' else 'RSS peak growth during the step'
    return dict(step_ms=step_ms, step_ratio_vs_ce={k: v / step_ms['ce'] for k, v in step_ms.items()},
                tok_s={k: B * T / v * 1000 for k, v in step_ms.items()}, peak_mem_bytes=mem,
                peak_mem_kind=kind, read_ms=read_ms, check_cost_share_of_step=check_share, host_batch_ms=host_ms,
                compressed_step_vs_plain=vs_plain, compressed_read_share_of_step=decode_share)


class RandomTeacher(torch.nn.Module):
    """A stand-in teacher for bench_pipeline: peaked random logits over the vocabulary, no weights."""
    def __init__(self, V):
        super().__init__()
        self.V = V

    def forward(self, idx, padded=False):  # (no padded vocabulary)
        gen = torch.Generator(idx.device).manual_seed(int(idx.sum()))
        return torch.randn(*idx.shape, self.V, generator=gen, device=idx.device) * 4


def bench_pipeline(cfg, env, tokens, V, B=16, T=1024):
    """The host's work per micro-batch at GPT-2 scale, B x T = 16 x 1024: the tokens, the cache rows
    and their checks, as training fetches them, from rs and topk caches of B sequences made by
    --mode cache from a random stand-in teacher (so any teacher, of any block size, will do)."""
    S = (len(tokens) - 1) // T
    if S < B:
        return dict(pipeline_shape=None, pipeline_host_ms={})
    host_ms = {}
    for method, fmt in rskd.FORMATS.items():
        run_cfg = replace(cfg, method=method, cache_dir=os.path.join(cfg.out_dir, f'bench-pipeline-{method}'),
                          block_size=T, batch_size=4, max_seqs=B, split='train')
        shutil.rmtree(run_cfg.cache_dir, ignore_errors=True)
        eager = SimpleNamespace(**dict(vars(env), compile=False))  # (compiling it gains nothing)
        with quiet():
            rskd.run_cache(run_cfg, eager, (RandomTeacher(V).to(env.device), dict(name='random', sha256='-')))
        reader = rskd.open_cache(run_cfg, fmt['loss'], tokens[:B * T + 1], V, env)[1]
        samples = []
        for _ in range(10):
            t0 = time.time()
            rskd.get_batch(tokens, list(range(B)), T, env)
            reader(list(range(B)))
            samples.append(time.time() - t0)
        host_ms[method] = 1000 * float(np.median(samples))
    return dict(pipeline_shape=f'{B}x{T}', pipeline_host_ms=host_ms)


def report(res, cfg):
    B, T = cfg.batch_size, cfg.block_size
    print(f"\nbench on {res['device']} ({res['dtype']}{', compiled' if res['compile'] else ''}), batch {B}x{T}")
    print(f"{'method':10} {'step ms':>9} {'vs ce':>6} {'tok/s':>8} {'peak MB':>8}   ({res['peak_mem_kind']})")
    for k in res['step_ms']:
        print(f"{k:10} {res['step_ms'][k]:9.1f} {res['step_ratio_vs_ce'][k]:6.3f} {res['tok_s'][k]:8,.0f} "
              f"{res['peak_mem_bytes'][k] / 2**20:8.0f}")
    for m, ms in res['host_batch_ms'].items():
        big = res['pipeline_host_ms'].get(m)  # (None when the data holds fewer than 16 x 1024 tokens)
        at_scale = f"; at {res['pipeline_shape']}: {big:.1f} ms" if big is not None else ""
        print(f"host time per micro-batch of {B}x{T} ({m}): {ms:.1f} ms next to a {res['step_ms'][m]:.1f} ms "
              f"step{at_scale} (prefetched while the GPU runs)")
    for m, r in res['read_ms'].items():
        print(f"reading a batch of the {m} cache: {r['checked']:.2f} ms with its checksums and values checked, "
              f"{r['unchecked']:.2f} ms without ({100 * res['check_cost_share_of_step'][m]:.2f}% of a step)")
    for name, e in res['teacher_bf16'].items():
        print(f"teacher under bf16 autocast, {name}: probabilities (> 1e-4) off float32's by {100 * e['median_rel_error']:.2f}% "
              f"(median), {100 * e['max_rel_error']:.1f}% (max); KL(fp32 || bf16) {e['kl_float32_to_bf16']:.2e}")
    speed, ratio = res['cache_tok_s'], res['cache_ratio_vs_fwd']
    print(f"teacher forward {res['teacher_fwd_tok_s']:,.0f} tok/s; cache " +
          ', '.join(f"{m} {speed[m]:,.0f} tok/s ({ratio[m]:.2f}x)" for m in speed) +
          "; x: the median of 5 cache runs / the forward run before each")
    report_storage(res)
    print(f"gradient vs full KD (student: {res['fidelity_student']})\n{'':16} {'unique':>6}  "
          f"{'logits: angle':>13} {'norm':>5}  {'weights: angle':>14} {'norm':>5}")
    for k in res['grad_angle_deg_logits']:
        cells = [f"{res[f'grad_angle_deg_{w}'][k]:12.1f}° {res[f'grad_norm_ratio_{w}'][k]:5.2f}"
                 for w in ('logits', 'weights')]
        print(f"{k:16} {res['unique_per_position'].get(k, float('nan')):6.1f}  " + '  '.join(cells))
    print(f"wrote {os.path.join(cfg.out_dir, 'bench.json')}")


def report_storage(res):
    for m, speed in res['compressed_cache_speed_vs_plain'].items():
        size, plain = res['cache_bytes'][m], res['cache_bytes'][f'{m} plain']
        print(f"{m} cache compressed: {size['per_entry_growing']:.2f} bytes/entry ({size['per_position']:.1f}/position; "
              f"{size['per_entry']:.2f} with vocab_order), plain {plain['per_entry']:.2f}; caching at {speed:.3f}x plain's speed, a training step "
              f"{res['compressed_step_vs_plain'][m]:.3f}x plain's (decoding: {100 * res['compressed_read_share_of_step'][m]:.2f}% of a step)")


def run_storage(cfg, env, sweep=(12, 50, 150)):
    """Compressed against plain caches, each ragged format at N = sweep rounds, side by side: bytes per
    entry, caching speed and a training step. Writes OUT_DIR/storage.json."""
    tokens, S, V = bench_split(cfg, env)
    T, B = cfg.block_size, cfg.batch_size
    loaded = load_teacher(cfg.teacher, V, T, env)
    student = fidelity_student(cfg, env, None, V)
    n, seqs = min(S, 4 * B), list(range(B))
    idx, targets = rskd.get_batch(tokens, seqs, T, env)
    methods = [m for m, f in rskd.FORMATS.items() if f['ragged']]
    rows = []
    for N in sweep:
        run_cfg = replace(cfg, rounds=N)
        caching = measured(f'caching at N = {N}', bench_caching, run_cfg, env, loaded, tokens, n, methods)
        steps = measured(f'steps at N = {N}', bench_steps, run_cfg, env, loaded[0], student, tokens, n, idx,
                         targets, seqs, caching['dirs'], ['ce', *storages(methods)], rotations=6)
        res = dict(**caching['result'], **steps)
        report_storage(res)
        for m in methods:
            rows.append(dict(method=m, rounds=N, bytes_per_entry=res['cache_bytes'][m]['per_entry_growing'],
                             plain_bytes_per_entry=res['cache_bytes'][f'{m} plain']['per_entry'],
                             bytes_per_position=res['cache_bytes'][m]['per_position'],
                             cache_tok_s=res['cache_tok_s'][m], plain_cache_tok_s=res['cache_tok_s'][f'{m} plain'],
                             cache_speed_vs_plain=res['compressed_cache_speed_vs_plain'][m],
                             step_vs_plain=res['compressed_step_vs_plain'][m],
                             decode_share_of_step=res['compressed_read_share_of_step'][m]))
    write_json(dict(device=env.name, batch=f'{B}x{T}', sequences=n, rows=rows), os.path.join(cfg.out_dir, 'storage.json'))
    print("\n| method | N | bytes/entry (plain) | bytes/position | cache tok/s (plain) | caching vs plain | step vs plain "
          "| decoding, % of a step |")
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['method']} | {r['rounds']} | {r['bytes_per_entry']:.2f} ({r['plain_bytes_per_entry']:.2f}) | "
              f"{r['bytes_per_position']:.1f} | {r['cache_tok_s']:,.0f} ({r['plain_cache_tok_s']:,.0f}) | "
              f"{r['cache_speed_vs_plain']:.3f}x | {r['step_vs_plain']:.3f}x | {100 * r['decode_share_of_step']:.2f} |")
    print(f"wrote {os.path.join(cfg.out_dir, 'storage.json')}")


GPT2_SHAPE = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)  # the teacher the GPU check makes
STUDENT_SHAPE = dict(n_layer=6, n_head=6, n_embd=384)


def run_gpu_check(cfg, env, teacher_shape=GPT2_SHAPE, student_shape=STUDENT_SHAPE, seqs=256, batch=8, steps=30,
                  tests=True):
    """The prepared GPU check, for whoever next has a GPU (under 8 minutes on one): the CUDA tests, then a
    GPT-2-shaped teacher with random weights (built here: no download), a cache and a short student run
    from it, and the bench at that shape, all on data from the Python stdlib (prepare_data.py's default).
    Writes OUT_DIR/gpu_check.json: pass/fail, peak memory, tok/s and the cache/forward ratio."""
    out, T = cfg.out_dir, teacher_shape['block_size']
    common = ['--device', cfg.device, '--dtype', cfg.dtype, '--compile', cfg.compile, '--block_size', str(T),
              '--batch_size', str(batch), '--data_dir', f'{out}/data']
    res = dict(device=env.name, torch=torch.__version__)
    if tests:  # (a child process: the tests make their own folders)
        t0 = time.time()
        p = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-k', 'cuda', 'test_rskd.py'],
                           cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
        res['cuda_tests'] = dict(exit_code=p.returncode, summary=(p.stdout.strip().splitlines() or [''])[-1],
                                 seconds=time.time() - t0)
        print(f"CUDA tests: {res['cuda_tests']['summary']}", flush=True)
    if not os.path.exists(f'{out}/data/meta.json'):
        with quiet():
            prepare_data.main(['--out', f'{out}/data'])
    tokens, S, V = bench_split(replace(cfg, block_size=T, batch_size=batch, data_dir=f'{out}/data'), env)
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(vocab_size=V, **teacher_shape))
    optimizer = teacher.configure_optimizers(0.0, 1e-4, (0.9, 0.95), 'cpu')
    save_checkpoint(f'{out}/teacher.pt', teacher, optimizer, torch.amp.GradScaler('cpu', enabled=False), 0,
                    math.inf, dict(mode='teacher'), [])
    del teacher, optimizer

    def timed(what, argv):  # rskd.main(argv): its wall time, peak GPU memory and the line that says its speed
        if env.device_type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        t0, log = time.time(), io.StringIO()
        with contextlib.redirect_stdout(log):
            rskd.main(argv)
        lines = [line for line in log.getvalue().splitlines() if 'tok/s' in line]
        res[what] = dict(seconds=time.time() - t0, last_line=lines[-1] if lines else '',
                         peak_gpu_bytes=torch.cuda.max_memory_allocated() if env.device_type == 'cuda' else None)
        print(f"{what}: {res[what]['last_line']} ({res[what]['seconds']:.0f}s)", flush=True)
    for d in (f'{out}/gpu-cache', f'{out}/gpu-student'):
        shutil.rmtree(d, ignore_errors=True)
    n = min(seqs, S)
    timed('cache', ['--mode', 'cache', '--teacher', f'{out}/teacher.pt', '--cache_dir', f'{out}/gpu-cache',
                    '--max_seqs', str(n), *common])
    shape = [a for k, v in student_shape.items() for a in (f'--{k}', str(v))]
    timed('student', ['--mode', 'train', '--loss', 'rskd', '--cache_dir', f'{out}/gpu-cache', '--max_seqs', str(n),
                      '--teacher', f'{out}/teacher.pt', '--out_dir', f'{out}/gpu-student', '--max_iters', str(steps),
                      '--eval_interval', str(steps), '--eval_iters', '2', '--warmup_iters', '5', *shape, *common])
    bench_out = f'{out}/gpu-bench'
    os.makedirs(bench_out, exist_ok=True)
    bench_cfg = replace(cfg, teacher=f'{out}/teacher.pt', out_dir=bench_out, data_dir=f'{out}/data', block_size=T,
                        batch_size=batch, **student_shape)
    with quiet():
        run_bench(bench_cfg, env)
    b = read_json(f'{bench_out}/bench.json', "run the GPU check again")
    res['bench'] = {k: b[k] for k in ('step_ms', 'step_ratio_vs_ce', 'peak_mem_bytes', 'peak_mem_kind', 'tok_s',
                                      'teacher_fwd_tok_s', 'cache_tok_s', 'cache_ratio_vs_fwd', 'cache_bytes')}
    write_json(res, os.path.join(out, 'gpu_check.json'))
    print("cache/forward: " + ', '.join(f"{m} {r:.2f}x" for m, r in b['cache_ratio_vs_fwd'].items()))
    print(f"wrote {os.path.join(out, 'gpu_check.json')}")


def run_rounds(cfg, env, sweep=(5, 12, 50, 150), n_seqs=64):
    """Distinct ids per position against the rounds N = 1..255, both samplers, on the first n_seqs
    sequences; and the gradient-fidelity table at the rounds in sweep. Writes OUT_DIR/rounds.json."""
    tokens, S, V = bench_split(cfg, env)
    T, B = cfg.block_size, cfg.batch_size
    teacher, _ = load_teacher(cfg.teacher, V, T, env)
    student_path = os.path.join(cfg.out_dir, 'ckpt.pt')
    ckpt = load_checkpoint(student_path) if os.path.exists(student_path) else None
    distinct = {sampler: np.zeros(255) for sampler in ('multinomial', 'systematic')}
    n = min(S, n_seqs)
    t0 = time.time()
    for lo in range(0, n, B):
        seqs = list(range(lo, min(lo + B, n)))
        idx = rskd.get_batch(tokens, seqs, T, env)[0]
        with torch.no_grad(), env.ctx:
            probs = torch.softmax(teacher(idx).float(), -1)
        for sampler, curve in distinct.items():
            for N in range(1, 256):
                gens = rskd.seq_generators(cfg.seed, seqs, env.device)
                lengths = rskd.run_lengths(rskd.sample_draws(probs, N, gens, sampler))[0]
                curve[N - 1] += lengths.sum().item() / (n * T)
        print(f"rounds: {seqs[-1] + 1}/{n} sequences, {time.time() - t0:.0f}s", flush=True)
    del probs
    student = fidelity_student(cfg, env, ckpt, V)
    seqs = list(range(B))
    idx, targets = rskd.get_batch(tokens, seqs, T, env)
    fidelity = bench_fidelity(cfg, env, teacher, student, idx, seqs, targets, sweep)
    res = dict(positions=n * T, distinct_per_position={k: v.tolist() for k, v in distinct.items()},
               fidelity_student=student_path if ckpt else 'random init', **fidelity)
    os.makedirs(cfg.out_dir, exist_ok=True)
    write_json(res, os.path.join(cfg.out_dir, 'rounds.json'))
    paper = {4: 2.4, 13: 5, 50: 12, 150: 24.5}  # the paper's 3B teacher (its power law), N up to 600
    print(f"\ndistinct ids per position, {n * T:,} positions\n{'N':>4} {'multinomial':>12} "
          f"{'systematic':>11} {'paper (3B)':>11}")
    for N in (1, 2, 3, 4, 5, 8, 12, 13, 20, 30, 46, 50, 75, 100, 150, 200, 255):
        print(f"{N:4} {distinct['multinomial'][N - 1]:12.2f} {distinct['systematic'][N - 1]:11.2f} "
              f"{paper.get(N, ''):>11}")
    print(f"\ngradient vs full KD (student: {res['fidelity_student']})\n{'':16} {'unique':>6}  "
          f"{'logits: angle':>13} {'norm':>5}  {'weights: angle':>14} {'norm':>5}")
    for N in sweep:
        for k in (f'multinomial{N}', f'systematic{N}'):
            cells = [f"{res[f'grad_angle_deg_{w}'][k]:12.1f}° {res[f'grad_norm_ratio_{w}'][k]:5.2f}"
                     for w in ('logits', 'weights')]
            print(f"{k:16} {res['unique_per_position'][k]:6.1f}  " + '  '.join(cells))
    print(f"wrote {os.path.join(cfg.out_dir, 'rounds.json')}")


def peak_memory_reset(env):
    # the memory in use now, to subtract from the peak: both figures are the growth during the step
    if env.device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        return 0
    return peak_memory(env)


def peak_memory(env):
    if env.device_type == 'cuda':
        return torch.cuda.max_memory_allocated()
    try:
        with open('/proc/self/status') as f:
            return 1024 * int(re.search(r'VmHWM:\s+(\d+)', f.read()).group(1))
    except OSError:
        return 0

# -----------------------------------------------------------------------------
# the tables of RESULTS.md, from the runs that RESULTS.md lists (out-NAME-SEED/, cache-*/ and out/)


# (row name, run name, the bench's step method for it, its cache folder)
ROWS = [('CE', 'ce', 'ce', ''), ('Top-K 12', 'topk', 'topk', 'cache-topk'),
        ('Top-K 12 + ghost', 'ghost', 'ghost', 'cache-topk'), ('RS-KD, 50 rounds', 'rskd', 'rs', 'cache-rs'),
        ('RS-KD systematic, 46', 'sys', 'rs', 'cache-sys'), ('Full KD', 'fullkd', 'fullkd', ''),
        ('Top-K 12 + label smoothing', 'smooth', 'smooth', 'cache-topk'),
        ('Top-K 12 + naive fix', 'naive', 'naive', 'cache-topk'),
        ('RS-KD, 50 rounds from t^0.8 (is)', 'is08', 'is', 'cache-is08'),
        ('RS-KD, 50 rounds from t^1.2 (is)', 'is12', 'is', 'cache-is12'),
        ('RS-KD, 5 rounds', 'rs5', 'rs', 'cache-rs5'), ('RS-KD, 12 rounds', 'rs12', 'rs', 'cache-rs12'),
        ('RS-KD, 150 rounds', 'rs150', 'rs', 'cache-rs150')]
SEEDS = (1, 2)


def read_metrics(path):
    """A metrics.jsonl's records, each checked against its crc32, as every file rskd reads."""
    with open(path, 'rb') as f:
        return [checked_json(line, f"{path} line {i}", "it is damaged") for i, line in enumerate(f, 1)]


def last_eval(run):
    evals = read_metrics(os.path.join(run, 'metrics.jsonl'))
    if not evals:
        die(f"{run}/metrics.jsonl holds no eval yet: finish the run, or move it away")
    return evals[-1]


def cache_size(cache):
    """'bytes per position (unique ids)' of a cache folder."""
    meta = read_json(os.path.join(cache, 'meta.json'), "make the cache again")
    P = meta['num_seqs'] * meta['block_size']
    size = f"{sum(map(os.path.getsize, glob.glob(os.path.join(cache, '*.bin')))) / P:.1f}"
    ragged = rskd.FORMATS.get(meta['method'], {}).get('ragged')
    return size + (f" ({meta['entries'] / P:.1f} unique)" if ragged else '')


def print_tables(rows=ROWS, seeds=SEEDS):
    step = read_json(os.path.join('out', 'bench.json'), "run the bench again")['step_ratio_vs_ce']
    missing = [r[0] for r in rows if not all(os.path.isdir(f'out-{r[1]}-{seed}') for seed in seeds)]
    rows = [r for r in rows if r[0] not in missing]
    if missing:
        print(f"(not in this folder, so left out: {', '.join(missing)})\n")
    print('| student | val loss | ECE % | KL to teacher | spec. accept % | step time vs CE | cache bytes/position |')
    print('|---|---|---|---|---|---|---|')
    for name, run, method, cache in rows:
        m = [last_eval(f'out-{run}-{seed}') for seed in seeds]

        def cell(key, scale=1, digits=3):  # the mean of the seeds, +- half their spread
            if not all(key in x for x in m):  # (no teacher: no kl_teacher, spec_accept)
                return '-'
            values = [scale * x[key] for x in m]
            spread = (max(values) - min(values)) / 2
            return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"
        size = cache_size(cache) if cache else '-'
        print(f"| {name} | {cell('val_loss')} | {cell('ece', 100, 2)} | {cell('kl_teacher')} | "
              f"{cell('spec_accept', 100, 1)} | {step.get(method, math.nan):.2f} | {size} |")
    print(f"\n| confidence (seed {seeds[0]}) | " + ' | '.join(r[0] for r in rows) + ' |')
    print('|---|' + '---|' * len(rows))
    for b in range(5):  # the 15 bins of [count, mean confidence, accuracy], merged 3 by 3
        cells = []
        for name, run, *_ in rows:
            bins = last_eval(f'out-{run}-{seeds[0]}')['reliability']
            merged, total = bins[3 * b:3 * b + 3], sum(x[0] for x in bins)
            count = sum(x[0] for x in merged)
            conf, acc = (sum(x[0] * x[i] for x in merged) / max(count, 1) for i in (1, 2))
            cells.append(f"{acc:.2f} @ {conf:.2f} ({100 * count / total:.0f}%)")
        print(f"| {b / 5:.1f}-{(b + 1) / 5:.1f} | " + ' | '.join(cells) + ' |')


def plot(rows=ROWS, seeds=SEEDS, out='plots'):
    """RESULTS.md's pictures, from the metrics.jsonl of the runs here (out-RUN-SEED): the
    students' reliability diagrams (seed 1) and their val-loss curves (every seed)."""
    try:
        import matplotlib
        matplotlib.use('Agg')  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        die("the plots need matplotlib: pip install matplotlib")
    rows = [r for r in rows if all(os.path.isdir(f'out-{r[1]}-{seed}') for seed in seeds)]
    if not rows:
        die(f"no runs here to plot (out-ce-{seeds[0]}, ...): run them first, as RESULTS.md says")
    os.makedirs(out, exist_ok=True)
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 3), sharey=True, squeeze=False)
    for ax, (name, run, *_) in zip(axes[0], rows):
        last = last_eval(f'out-{run}-{seeds[0]}')
        count, conf, acc = np.array(last['reliability']).T  # per confidence bin
        edges = np.linspace(0, 1, len(count) + 1)
        ax.bar(edges[:-1], acc, width=np.diff(edges), align='edge', edgecolor='k', label='accuracy')
        ax.plot([0, 1], [0, 1], ':', color='gray', label='calibrated')
        ax.plot(conf[count > 0], acc[count > 0], '.', color='C3', label='mean confidence')
        ax.set(title=f"{name}\nECE {100 * last['ece']:.1f}%", xlabel='confidence', xlim=(0, 1))
    axes[0][0].set(ylabel='accuracy', ylim=(0, 1))
    axes[0][0].legend(fontsize=7, loc='upper left')
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'reliability.png'), dpi=110)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (name, run, *_) in enumerate(rows):
        for seed, style in zip(seeds, ('-', '--', ':')):
            evals = read_metrics(f'out-{run}-{seed}/metrics.jsonl')
            ax.plot([e['iter'] for e in evals], [e['val_loss'] for e in evals], style, color=f'C{i}',
                    label=f"{name}, seed {seed}")
    ax.set(xlabel='step', ylabel='val loss', ylim=(None, ax.get_ylim()[0] + 3))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'val_loss.png'), dpi=110)
    plt.close('all')
    print(f"wrote {out}/reliability.png and {out}/val_loss.png")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with entry_point():  # one line for any error, an honest exit status
        if argv[:1] == ['tables']:
            return print_tables()
        if argv[:1] == ['plots']:
            return plot()
        sub = argv[0] if argv[:1] in (['rounds'], ['storage'], ['gpu']) else None
        args = parse_args(rskd.Config, argv[bool(sub):], rskd.TEACHER, __doc__)
        if sub == 'gpu':  # (its own folder: data, teacher, runs)
            args.setdefault('out_dir', 'gpu-check')
        cfg, _ = resolve_config(rskd.Config, dict(args, mode='bench'), rskd.TEACHER, rskd.FORMATS,
                                rskd.OBJECTIVES)
        env = setup(cfg)
        if sub == 'gpu' and env.device_type != 'cuda':
            die(f"bench.py gpu is the GPU check: it needs CUDA, and this run's device is {env.device}")
        with folder_lock(output_folder(cfg, env)):
            dict(rounds=run_rounds, storage=run_storage, gpu=run_gpu_check).get(sub, run_bench)(cfg, env)


if __name__ == '__main__':
    main()
