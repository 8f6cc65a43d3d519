"""
rskd: Random Sampling Knowledge Distillation ("Sparse Logit Sampling", Anshumann et al., ACL 2025).

Run the teacher over the training tokens once, keep a few sampled token ids per position, and train a
student on them. The sampled target counts/rounds is an unbiased estimate of the teacher's distribution,
so the student's gradient equals full distillation's in expectation, at ~3 bytes per stored token.

  python prepare_data.py                                          # tokens -> data/
  python rskd.py --mode teacher                                   # a CE-trained teacher -> out-teacher/ckpt.pt
  python rskd.py --mode cache --cache_dir cache-rs                # RS-KD cache: 50 draws per position
  python rskd.py --mode cache --cache_dir cache-topk --method topk --k 12   # the Top-K baseline's cache
  python rskd.py --mode train --loss rskd --cache_dir cache-rs    # the student -> out/
  python rskd.py --mode train --loss topk --cache_dir cache-topk [--topk_tail ghost]
  python rskd.py --mode train --loss fullkd                       # online teacher, full-vocabulary KL
  python rskd.py --mode train --loss ce                           # no teacher at all
  python rskd.py --mode bench                                     # speed, memory, gradient fidelity
  torchrun --standalone --nproc_per_node=8 rskd.py --mode cache ...   # any mode on several GPUs
Every option is a field of Config below: python rskd.py --help
"""
import argparse
import errno
import functools
import gc
import hashlib
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# config: every knob, one comment each; the command line is generated from it


@dataclass
class Config:
    mode: str = 'train'              # teacher | cache | train | bench
    data_dir: str = 'data'           # train.bin, val.bin and meta.json from prepare_data.py
    out_dir: str = 'out'             # ckpt.pt, metrics.jsonl and bench.json go here
    cache_dir: str = 'cache-rs'      # the teacher cache: written by --mode cache, read by --loss rskd|topk
    teacher: str = 'out-teacher/ckpt.pt'  # a --mode teacher checkpoint, gpt2[-medium|-large|-xl] or an HF dir
    resume: bool = False             # continue the run saved in out_dir/ckpt.pt
    max_seqs: int = 0                # use only the first max_seqs sequences of the split (0 = all)
    n_layer: int = 2                 # transformer blocks
    n_head: int = 4                  # attention heads
    n_embd: int = 128                # embedding width
    block_size: int = 128            # sequence length T; training windows and cache rows both use it
    batch_size: int = 16             # sequences per micro-step (and per cache chunk)
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step over all ranks (torchrun: world size)
    max_iters: int = 200             # optimizer steps
    lr_decay_iters: int = 0          # length of the cosine schedule (0 = max_iters); set it to extend a run
    learning_rate: float = 3e-3      # peak learning rate
    min_lr: float = 3e-4             # learning rate at the end of the cosine decay
    warmup_iters: int = 20           # linear warmup steps
    weight_decay: float = 0.1        # AdamW weight decay on matrices
    grad_clip: float = 1.0           # clip the gradient norm (0 = off)
    eval_interval: int = 100         # evaluate and checkpoint every this many steps
    eval_iters: int = 10             # val batches per eval: a fixed subset, the same for every run
    log_interval: int = 10           # print a training line every this many steps
    loss: str = 'rskd'               # rskd | topk | fullkd | ce (the student's objective)
    topk_tail: str = 'none'          # none | ghost: Top-K's leftover mass as one extra "ghost" bucket
    alpha: float = 0.0               # weight of ground-truth cross-entropy added to the KD loss
    method: str = 'rs'               # rs | topk: what --mode cache stores
    sampler: str = 'multinomial'     # multinomial (the paper) | systematic (lower variance, still unbiased)
    rounds: int = 50                 # RS draws per position, 1..255
    k: int = 12                      # Top-K entries per position
    split: str = 'train'             # train | val: the split --mode cache runs over
    device: str = 'auto'             # auto (cuda if there is one, else cpu) | cpu | cuda | cuda:N
    dtype: str = 'auto'              # auto (bfloat16 on GPUs that have it, else float16; float32 on CPU) | ...
    compile: str = 'auto'            # auto (on for CUDA) | true | false: torch.compile the models
    seed: int = 1337                 # model init, data order and cache sampling all derive from it


# --mode teacher trains a larger model (it must know more than the student) into its own folder
TEACHER = dict(out_dir='out-teacher', n_layer=4, n_head=4, n_embd=256, max_iters=250, eval_interval=125,
               learning_rate=2e-3, min_lr=2e-4)
CHOICES = dict(mode=('teacher', 'cache', 'train', 'bench'), loss=('rskd', 'topk', 'fullkd', 'ce'),
               topk_tail=('none', 'ghost'), method=('rs', 'topk'), sampler=('multinomial', 'systematic'),
               split=('train', 'val'), dtype=('auto', 'float32', 'bfloat16', 'float16'),
               compile=('auto', 'true', 'false'))
HF_TEACHERS = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
# a resumed run must keep these, or its data order and model would silently change
RESUME_FIXED = ('mode', 'n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'gradient_accumulation_steps',
                'max_seqs', 'seed', 'loss', 'cache_dir')


def first_line(e):
    return (str(e).splitlines() or [type(e).__name__])[0]


def die(msg):
    """A problem the user can fix: one line that says what to do, no traceback, exit status 1."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def parse_args(argv):
    """The options given on the command line, as a dict (defaults are filled in later, per mode)."""
    comments = dict(re.findall(r'^    (\w+): \w+ = .*?# (.*)$', inspect.getsource(Config), re.M))

    def boolean(s):
        if s.lower() not in ('true', 'false', '1', '0'):
            raise ValueError(s)
        return s.lower() in ('true', '1')

    p = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0])
    p.error = lambda msg: die(f"{msg} (see --help)")  # one line, not argparse's usage block
    for f in fields(Config):
        extra = f" [teacher: {TEACHER[f.name]}]" if f.name in TEACHER else ""
        p.add_argument(f'--{f.name}', type=boolean if f.type is bool else f.type, default=None,
                       **(dict(nargs='?', const=True) if f.type is bool else {}),  # --resume = --resume true
                       choices=CHOICES.get(f.name), metavar=f.type.__name__.upper(),
                       help=f"{comments[f.name]} (default: {f.default}){extra}")
    return {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}


def check_config(cfg):
    if not 1 <= cfg.rounds <= 255:
        die(f"--rounds must be 1..255 (counts are stored as uint8), got {cfg.rounds}")
    for name in ('batch_size', 'block_size', 'gradient_accumulation_steps', 'n_layer', 'n_head', 'n_embd',
                 'eval_interval', 'eval_iters', 'log_interval', 'k'):
        if getattr(cfg, name) < 1:
            die(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head:
        die(f"--n_embd {cfg.n_embd} must be a multiple of --n_head {cfg.n_head}")
    for name in ('max_iters', 'max_seqs', 'alpha', 'learning_rate', 'min_lr', 'warmup_iters', 'lr_decay_iters',
                 'weight_decay', 'grad_clip'):
        if getattr(cfg, name) < 0:
            die(f"--{name} cannot be negative, got {getattr(cfg, name)}")
    if not re.fullmatch(r'auto|cpu|cuda(:\d+)?', cfg.device):
        die(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device}")


def read_json(path, schema, what):
    """Parse a meta.json and check it field by field against schema (name -> type or nested schema)."""
    if not os.path.exists(path):
        die(f"{path} not found: {what}")
    try:
        with open(path) as f:
            d = json.load(f)
    except (ValueError, UnicodeDecodeError):
        die(f"{path} is not valid JSON: {what}")
    check_fields(d, schema, path)
    return d


def check_fields(d, schema, where):
    if not isinstance(d, dict) or set(d) != set(schema):
        have = set(d) if isinstance(d, dict) else set()
        die(f"{where}: missing fields {sorted(set(schema) - have)}, unexpected fields {sorted(have - set(schema))};"
            f" it was not written by this version of rskd")
    for k, kind in schema.items():
        if isinstance(kind, dict):
            check_fields(d[k], kind, f"{where} field '{k}'")
        elif not isinstance(d[k], kind) or (kind is int and isinstance(d[k], bool)):
            die(f"{where}: field '{k}' should be {getattr(kind, '__name__', 'a number')}, found {d[k]!r}")


def setup(cfg):
    """Distributed run (under torchrun) or not, device, mixed precision. Returns a namespace."""
    env = argparse.Namespace(ddp='RANK' in os.environ, rank=0, world=1)
    if env.ddp:
        use_cuda = torch.cuda.is_available() and cfg.device != 'cpu'
        dist.init_process_group('nccl' if use_cuda else 'gloo')
        env.rank, env.world = dist.get_rank(), dist.get_world_size()
        env.device = f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else 'cpu'
        if use_cuda:
            torch.cuda.set_device(env.device)
    elif cfg.device == 'auto':  # (not mps: it has no float64, which exact sampling and the metrics use)
        env.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    elif cfg.device.startswith('cuda') and torch.cuda.device_count() <= int(cfg.device[5:] or 0):
        die(f"--device {cfg.device}, but this PyTorch sees {torch.cuda.device_count()} CUDA GPUs: use --device cpu")
    else:
        env.device = cfg.device
    env.master = env.rank == 0
    env.type = 'cuda' if env.device.startswith('cuda') else env.device
    if env.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = cfg.dtype
    if dtype == 'auto':
        dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if env.type == 'cuda' else 'float32'
    env.dtype = dtype
    env.ctx = nullcontext() if dtype == 'float32' else torch.autocast(env.type, dtype=getattr(torch, dtype))
    env.compile = cfg.compile == 'true' or (cfg.compile == 'auto' and env.type == 'cuda')
    return env


def sync(env):
    if env.type == 'cuda':
        torch.cuda.synchronize()


def on_master(fn, env):
    """fn() on rank 0, its result broadcast to every rank: one pass over a big file, not one per rank."""
    out = [fn() if env.master else None]
    if env.ddp:
        dist.broadcast_object_list(out, src=0)
    return out[0]

# -----------------------------------------------------------------------------
# data: memory-mapped uint16 tokens; sequence s is the window tokens[s*T : s*T+T+1]


DATA_META = dict(tokenizer=str, vocab_size=int, eot=int, dtype=str, train_tokens=int, val_tokens=int,
                 train_docs=int, val_docs=int, val_fraction=(int, float), source=list)


def load_split(cfg, split, env, max_seqs=0):
    """Memory-map DATA_DIR/split.bin after checking it. Returns (tokens, number of sequences, vocab_size)."""
    meta = read_json(os.path.join(cfg.data_dir, 'meta.json'), DATA_META, "run prepare_data.py first")
    path, V, T = os.path.join(cfg.data_dir, f'{split}.bin'), meta['vocab_size'], cfg.block_size
    if not os.path.exists(path):
        die(f"{path} not found: rerun prepare_data.py")
    size = os.path.getsize(path)
    if size % 2 or size // 2 != meta[f'{split}_tokens']:
        die(f"{path} has {size} bytes, meta.json says {meta[f'{split}_tokens']} uint16 tokens: rerun prepare_data.py")
    n = size // 2
    if max_seqs:
        n = min(n, max_seqs * T + 1)
    if n < T + 1:
        die(f"{path} holds {n} tokens, fewer than one block of {T}+1: use a smaller --block_size or more data")
    tokens = np.memmap(path, dtype=np.uint16, mode='r', shape=(n,))
    # a chunked scan, never the whole file in RAM
    if on_master(lambda: max(int(tokens[i:i + (1 << 26)].max()) for i in range(0, n, 1 << 26)), env) >= V:
        die(f"{path} holds token ids >= vocab_size {V}: it was not made with this tokenizer")
    return tokens, (n - 1) // T, V


def data_fingerprint(tokens, path, env):
    def sha256():
        h = hashlib.sha256()
        for i in range(0, len(tokens), 1 << 26):
            h.update(tokens[i:i + (1 << 26)].tobytes())
        return h.hexdigest()
    return dict(path=os.path.abspath(path), n_tokens=len(tokens), sha256=on_master(sha256, env))


def get_batch(tokens, seqs, T, env):
    """x, y = tokens[s*T : s*T+T], tokens[s*T+1 : s*T+T+1] for each sequence s, as (B, T) int64."""
    idx = np.asarray(seqs, dtype=np.int64)[:, None] * T + np.arange(T + 1)  # (B, T+1)
    xy = torch.from_numpy(tokens[idx].astype(np.int64))
    if env.type == 'cuda':
        xy = xy.pin_memory().to(env.device, non_blocking=True)
    return xy[:, :-1].to(env.device), xy[:, 1:].to(env.device)


@functools.lru_cache(maxsize=2)
def epoch_permutation(S, seed, epoch):
    return torch.randperm(S, generator=torch.Generator().manual_seed(seed + epoch)).numpy()


def draw_seqs(S, seed, start, count):
    """Draws start..start+count-1 of an endless stream of epochs, each a fresh permutation of the S sequences
    (sampling without replacement; any draw is a pure function of its number, which makes resume exact)."""
    return [int(epoch_permutation(S, seed, n // S)[n % S]) for n in range(start, start + count)]

# -----------------------------------------------------------------------------
# the sparse targets: random sampling (RS-KD) and the Top-K baseline


def seq_generators(seed, seqs, device):
    # one random stream per sequence, seeded by (seed, sequence): the cache does not depend on batching,
    # resume points or the number of ranks
    return [torch.Generator(device).manual_seed(seed * 1_000_003 + s) for s in seqs]


def group_reduce(probs, op, group=16):
    """(..., V) -> (..., G): the 'sum' or the 'max' over each group of about `group` tokens. Token j is in
    group j % G, G = ceil(V / group): a group's members are G apart, so this is one vectorised pass over a
    (V // G, G) view, plus the last V - (V // G) * G tokens, which join the first groups."""
    reduce, combine = (torch.sum, torch.add) if op == 'sum' else (torch.amax, torch.maximum)
    V = probs.shape[-1]
    G = -(-V // group)
    q = V // G
    out = reduce(probs[..., :q * G].unflatten(-1, (q, G)), -2)
    out[..., :V - q * G] = combine(out[..., :V - q * G], probs[..., q * G:])
    return out


def group_members(groups, V, group=16):
    """group indices (...) -> the ids of their tokens (..., V // G + 1), ascending; an id >= V is no token."""
    G = -(-V // group)
    return groups.unsqueeze(-1) + G * torch.arange(V // G + 1, device=groups.device)


def by_rows(*xs):
    """(B, T, ...) tensors -> their chunks of matching rows (positions), as tuples of (rows, ...) views. On CPU
    128 positions at a time: a whole batch's temporaries would be fresh memory every time (page faults) and
    out of cache. CUDA takes the batch in one go."""
    rows = 128 if xs[0].device.type == 'cpu' else xs[0].shape[0] * xs[0].shape[1]
    return zip(*(x.flatten(0, 1).split(rows) for x in xs))


def sample_draws(probs, rounds, gens, sampler='multinomial', group=16):
    """Draw `rounds` tokens with replacement from each row of probs (B, T, V), unnormalised is fine;
    returns the draws sorted per row, (B, T, rounds).

    Both samplers put points in (0, 1] and return the token whose CDF interval (cdf[i-1], cdf[i]] holds
    each point, so a token is drawn with probability exactly p_i and a zero-probability token never is.
    multinomial: `rounds` independent uniform points (the paper).
    systematic: ONE uniform u per row and the grid (j + 1 - u) / rounds, j = 0..rounds-1. Point j is
    uniform on its own slice (j/N, (j+1)/N], so E[count_i] = N * p_i: still exactly unbiased. But the
    points are evenly spaced, so count_i is always floor or ceil of N * p_i: far lower variance.

    The CDF is two-level and float64: first the group of ~`group` tokens (group_reduce) whose mass holds
    the point, then the token inside that group. One float32 CDF over 50k tokens would round every token's
    interval by ~1e-8 (absolute), a large relative error for the many tiny probabilities; here it is ~1e-7
    relative. (Which token stands where in the CDF does not matter: any order gives each its own p_i.)"""
    B, T, V = probs.shape
    uniform = torch.stack([torch.rand(T, rounds if sampler == 'multinomial' else 1, generator=g, device=g.device,
                                      dtype=torch.float64) for g in gens])  # (B, T, rounds or 1), a stream per sequence
    draws = []
    for p, u in by_rows(probs, uniform):
        mass = group_reduce(p, 'sum', group)  # (rows, G)
        cdf = mass.cumsum(-1, dtype=torch.float64)
        points = 1 - u if sampler == 'multinomial' else (torch.arange(1, rounds + 1, device=u.device) - u) / rounds
        points = points * cdf[:, -1:]  # (rows, rounds), ascending for systematic
        g = torch.searchsorted(cdf, points).clamp_(max=cdf.shape[-1] - 1)  # the first group with cdf >= point
        cols = group_members(g, V, group)  # (rows, rounds, members)
        vals = p.gather(-1, cols.clamp(max=V - 1).flatten(1)).view(cols.shape).double()
        inner = vals.masked_fill_(cols >= V, 0).cumsum(-1)  # the chosen group's own CDF
        # the point's offset inside its group, rescaled to the inner CDF and kept in (0, total]: float
        # rounding can then never land it on a zero-probability token
        rest = (points - cdf.gather(-1, g)) / mass.gather(-1, g) + 1
        rest = torch.minimum((rest * inner[..., -1]).clamp_(min=torch.finfo(torch.float64).tiny), inner[..., -1])
        draws.append(cols.gather(-1, torch.searchsorted(inner, rest.unsqueeze(-1))).squeeze(-1))
    return torch.cat(draws).view(B, T, rounds).sort(-1).values


def top_k(probs, k, group=16):
    """torch.topk(probs, k, dim=-1) as (values, ids), exact, a few times faster on CPU when k << V: the k
    largest values lie in the k groups (group_reduce) with the largest maxima, since a token outside them
    is beaten by each of those k maxima. So only their k * group members are sorted. (Equal values may
    come out in another order.)"""
    V = probs.shape[-1]
    if k * group > V // 4:  # few groups: the candidates would cost more than a plain topk
        top = probs.topk(k, dim=-1)
        return top.values, top.indices
    groups = group_reduce(probs, 'max', group).topk(k, dim=-1).indices  # (..., k)
    cols = group_members(groups, V, group).flatten(-2)
    vals = probs.gather(-1, cols.clamp(max=V - 1)).masked_fill_(cols >= V, float('-inf'))
    top = vals.topk(k, dim=-1)
    return top.values, cols.gather(-1, top.indices)


def run_lengths(draws):
    """Sorted draws (..., N) -> (lengths, ids, counts): per row the number of distinct ids, then all rows'
    distinct ids (ascending within a row) with how often each was drawn, flattened row after row."""
    new = torch.ones_like(draws, dtype=torch.bool)
    new[..., 1:] = draws[..., 1:] != draws[..., :-1]  # True where a run of equal ids starts
    starts = new.flatten().nonzero().squeeze(1)
    counts = torch.diff(starts, append=starts.new_tensor([draws.numel()]))
    return new.sum(-1), draws.flatten()[starts], counts


def pad_rows(lengths, ids, values):
    """Ragged rows -> padded (R, K) ids and values, K the longest row; padding is id 0 with value 0."""
    lengths = lengths.flatten().long()
    R, K = len(lengths), int(lengths.max())
    row = torch.repeat_interleave(torch.arange(R, device=ids.device), lengths)
    slot = torch.arange(len(ids), device=ids.device) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    out_ids = torch.zeros(R, K, dtype=torch.long, device=ids.device)
    out_values = torch.zeros(R, K, dtype=torch.float32, device=ids.device)
    out_ids[row, slot], out_values[row, slot] = ids.long(), values.float()
    return out_ids, out_values

# -----------------------------------------------------------------------------
# the losses: float32, (B, T, V) logits in, a scalar out; never a dense target


def sparse_kd_loss(logits, ids, w):
    # KL(t^s || p) = sum_i w_i (log w_i - log p_i), summed over the stored ids only, with p the student's
    # softmax over the FULL vocabulary. RS-KD: w = counts / rounds, unbiased for t, so the gradient
    # p * sum(w) - w is the full-KD gradient p - t in expectation. Vanilla Top-K: w = the top K teacher
    # probabilities, not renormalised, and the gradient is (sum_K t) * p - t. Padding has w = 0.
    # log_softmax + gather = logits.gather(ids) - logsumexp(logits), with the same kernels as cross-entropy
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, ids)  # (B, T, K)
    return (torch.xlogy(w, w) - w * logp).sum(-1).mean()


def ghost_kd_loss(logits, ids, t):
    # the Top-K tokens plus one "ghost" bucket holding the rest of the mass, T_K = sum_K t, P_K = sum_K p:
    # L = sum_K t_i log(t_i / p_i) + (1 - T_K) log((1 - T_K) / (1 - P_K)).
    # log(1 - P_K) is a logsumexp over the tail's own logits: accurate even when the tail mass is tiny
    logp_all = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    logp = logp_all.gather(-1, ids)
    # (the K slots get the most negative float, not -inf, so that an empty tail (K = V) stays finite)
    log_tail_p = torch.logsumexp(logp_all.scatter(-1, ids, torch.finfo(torch.float32).min), dim=-1)
    # K = V leaves no tail: whatever float16 rounding left of 1 - T_K is not mass
    tail_t = (1 - t.sum(-1)).clamp(min=0) * (ids.shape[-1] < logits.shape[-1])
    return ((torch.xlogy(t, t) - t * logp).sum(-1) + torch.xlogy(tail_t, tail_t) - tail_t * log_tail_p).mean()


def full_kd_loss(logits, teacher_logits):
    # KL(t || p) = sum_v t_v (log t_v - log p_v) over the whole vocabulary: the upper bound
    logt = F.log_softmax(teacher_logits.float(), dim=-1)
    return (logt.exp() * (logt - F.log_softmax(logits.float(), dim=-1))).sum(-1).mean()


def ce_loss(logits, targets):
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

# -----------------------------------------------------------------------------
# metrics: val loss, calibration (ECE), and agreement with the teacher


NBINS = 15


@torch.no_grad()
def evaluate(model, teacher, val, val_seqs, cfg, env):
    """Sums over this rank's share of the fixed val subset, all-reduced: identical on any number of ranks."""
    model.eval()
    s = torch.zeros(4 + 3 * NBINS, dtype=torch.float64, device=env.device)  # nll, n, kl, accept, bins
    mine = val_seqs[env.rank::env.world]
    for i in range(0, len(mine), cfg.batch_size):
        x, y = get_batch(val, mine[i:i + cfg.batch_size], cfg.block_size, env)
        with env.ctx:
            logits = model(x)
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        s[0] += F.nll_loss(logp.flatten(0, 1), y.flatten(), reduction='sum')
        s[1] += y.numel()
        conf, pred = logp.max(-1)
        conf = conf.exp().flatten()  # top-1 confidence
        bins = (conf * NBINS).long().clamp(max=NBINS - 1)
        s[4:4 + NBINS] += torch.bincount(bins, minlength=NBINS)
        s[4 + NBINS:4 + 2 * NBINS] += torch.bincount(bins, conf, minlength=NBINS)
        s[4 + 2 * NBINS:] += torch.bincount(bins, (pred == y).flatten().float(), minlength=NBINS)
        if teacher is not None:
            with env.ctx:
                logt = F.log_softmax(teacher(x).float(), dim=-1)
            s[2] += (logt.exp() * (logt - logp)).sum()  # KL(teacher || student)
            s[3] += torch.minimum(logp.exp(), logt.exp()).sum()  # sum_v min(p, t) = 1 - TV
    if env.ddp:
        dist.all_reduce(s)
    model.train()
    s = s.tolist()
    n, count, conf_sum, acc_sum = s[1], s[4:4 + NBINS], s[4 + NBINS:4 + 2 * NBINS], s[4 + 2 * NBINS:]
    out = dict(val_loss=s[0] / n, val_ppl=math.exp(s[0] / n),
               ece=sum(abs(a - c) for a, c in zip(acc_sum, conf_sum)) / n,  # sum_b (n_b/n) |acc_b - conf_b|
               reliability=[[c, cs / max(c, 1), a / max(c, 1)] for c, cs, a in zip(count, conf_sum, acc_sum)])
    if teacher is not None:
        out.update(kl_teacher=s[2] / n, spec_accept=s[3] / n)
    return out

# -----------------------------------------------------------------------------
# checkpoints and teachers


def save_atomic(write, path):
    """write(file) into a temp file, then rename: a reader sees the old file or the new one, never half."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)  # the rename, durable too
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if e.errno == errno.ENOSPC:
            die(f"the disk is full while writing {path}; the previous version is intact. Free space and rerun")
        raise


def write_json(d, path):
    save_atomic(lambda f: f.write(json.dumps(d, indent=1).encode()), path)


def load_checkpoint(path):
    """torch.load with weights_only=True: tensors, dicts and numbers only, a checkpoint cannot run code."""
    if not os.path.isfile(path):
        die(f"checkpoint {path} not found: train it first (--mode teacher or --mode train) or fix the path")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        die(f"{path} is not a valid rskd checkpoint ({type(e).__name__}): it is corrupt or not ours")
    if not isinstance(ckpt, dict) or not {'model', 'model_config', 'config', 'iter_num'} <= set(ckpt):
        die(f"{path} is not an rskd checkpoint (missing model weights or config)")
    return ckpt


def weights_sha256(model):
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_teacher(name, vocab_size, block_size, env):
    """A frozen teacher in eval mode, and {name, sha256 of its weights} to record in caches."""
    hf = name in HF_TEACHERS or os.path.isdir(name)
    if os.path.isdir(name) and not os.path.exists(os.path.join(name, 'config.json')):
        die(f"teacher {name} is a folder without config.json: pass a --mode teacher checkpoint file "
            f"({os.path.join(name, 'ckpt.pt')}?) or a Hugging Face GPT-2 folder")
    if hf:
        try:
            import transformers  # only Hugging Face teachers need it
        except ImportError:
            die(f"teacher {name} is a Hugging Face model: pip install transformers")
        try:
            c = transformers.AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            die(f"could not load Hugging Face teacher {name}: {first_line(e)}")
        shape = dict(vocab_size=getattr(c, 'vocab_size', None), block_size=getattr(c, 'n_positions', None))
        name = name if name in HF_TEACHERS else os.path.abspath(name)
    else:
        ckpt = load_checkpoint(name)
        shape, name = ckpt['model_config'], os.path.abspath(name)
    # check before loading the weights: the vocabulary first, as a non-GPT-2 model fails here
    if shape.get('vocab_size') != vocab_size:
        die(f"teacher {name} has a vocabulary of {shape.get('vocab_size')} tokens, the data has {vocab_size}: "
            f"the teacher must use the data's tokenizer")
    if hf and c.model_type != 'gpt2':
        die(f"teacher {name} is a {c.model_type} model: only GPT-2-architecture teachers load into model.py")
    if (shape.get('block_size') or 0) < block_size:
        die(f"teacher {name} has block_size {shape.get('block_size')}, shorter than --block_size {block_size}")
    if hf:
        try:
            model = GPT.from_pretrained(name)
        except OSError as e:  # no network, or a folder without weights
            die(f"could not load the weights of Hugging Face teacher {name}: {first_line(e)}")
    else:
        try:
            model = GPT(GPTConfig(**shape))
            model.load_state_dict(ckpt['model'])
        except (TypeError, RuntimeError):
            die(f"{name} does not hold the weights of a model.py GPT: it is not a teacher checkpoint")
    info = dict(name=name, sha256=weights_sha256(model))
    return model.to(env.device).eval().requires_grad_(False), info

# -----------------------------------------------------------------------------
# cache mode: run the teacher once, store its sparse targets (format: see the README)


CACHE_META = dict(format=str, version=int, method=str, vocab_size=int, block_size=int, num_seqs=int, seed=int,
                  split=str, teacher=dict(name=str, sha256=str), data=dict(path=str, n_tokens=int, sha256=str),
                  ids_dtype=str, dtype=str, device=str, complete=bool, seqs_done=int, entries=int)
METHOD_META = dict(rs=dict(rounds=int, sampler=str), topk=dict(k=int))
PROGRESS = ('complete', 'seqs_done', 'entries')


def cache_files(meta):
    """file name -> (numpy dtype, number of elements once meta['seqs_done'] sequences are written)."""
    P, idt = meta['seqs_done'] * meta['block_size'], meta['ids_dtype']
    if meta['method'] == 'rs':
        return dict(lengths=('uint8', P), ids=(idt, meta['entries']), counts=('uint8', meta['entries']),
                    seq_offsets=('uint64', meta['seqs_done'] + 1))
    return dict(ids=(idt, P * meta['k']), probs=('float16', P * meta['k']))


def read_cache_meta(cache_dir):
    path = os.path.join(cache_dir, 'meta.json')
    if not os.path.exists(path):
        die(f"no cache in {cache_dir}: make one with --mode cache --cache_dir {cache_dir}")
    with open(path) as f:
        try:
            method = json.load(f).get('method')
        except (ValueError, AttributeError):
            die(f"{path} is not valid JSON: delete {cache_dir} and rerun --mode cache")
    if method not in METHOD_META:
        die(f"{path} has method {method!r}, not rs or topk: delete {cache_dir} and rerun --mode cache")
    meta = read_json(path, {**CACHE_META, **METHOD_META[method]}, "rerun --mode cache")
    if not (meta['format'] == 'rskd-cache' and meta['version'] == 1 and meta['ids_dtype'] in ('uint16', 'int32')
            and 0 <= meta['seqs_done'] <= meta['num_seqs'] and meta['complete'] == (meta['seqs_done'] == meta['num_seqs'])
            and (1 <= meta['rounds'] <= 255 and meta['sampler'] in CHOICES['sampler'] if method == 'rs' else meta['k'] >= 1)):
        die(f"{path} holds values that rskd never writes: delete {cache_dir} and make the cache again")
    return meta


def cache_memmaps(cache_dir, meta):
    """The cache's files, memory-mapped, after checking each one's size against meta.json."""
    mm = {}
    for name, (dt, n) in cache_files(meta).items():
        path = os.path.join(cache_dir, f'{name}.bin')
        if not os.path.exists(path) or os.path.getsize(path) != n * np.dtype(dt).itemsize:
            die(f"{path} does not have the size {cache_dir}/meta.json gives: the cache is damaged; delete it "
                f"and make it again with --mode cache")
        mm[name] = np.memmap(path, dtype=dt, mode='r', shape=(n,))
    return mm


@torch.no_grad()
def cache_batch(teacher, x, seqs, cfg, env):
    """The teacher's sparse targets for a batch of sequences, as numpy arrays to append to the files."""
    with env.ctx:
        logits = teacher(x).float()  # (B, T, V), real vocabulary only
    # the teacher's softmax in float32. On CPU in place: a fresh 400 MB tensor per batch costs more in page
    # faults than the softmax itself (CUDA's allocator reuses its memory)
    probs = torch.softmax(logits, -1, out=logits) if logits.device.type == 'cpu' else torch.softmax(logits, -1)
    if cfg.method == 'topk':
        parts = [top_k(p, cfg.k) for p, in by_rows(probs)]  # (rows, k) each, descending, not renormalised
        values, ids = torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])
        return dict(ids=ids.cpu().numpy().reshape(-1), probs=values.half().cpu().numpy().reshape(-1))
    gens = seq_generators(cfg.seed, seqs, env.device)
    lengths, ids, counts = run_lengths(sample_draws(probs, cfg.rounds, gens, cfg.sampler))
    return dict(lengths=lengths.cpu().numpy().reshape(-1), ids=ids.cpu().numpy(), counts=counts.cpu().numpy())


def run_cache(cfg, env):
    """Returns the throughput (tok/s) of the sampling loop, for bench."""
    tokens, S, V = load_split(cfg, cfg.split, env, cfg.max_seqs)
    T, B = cfg.block_size, cfg.batch_size
    if cfg.method == 'topk' and cfg.k > V:
        die(f"--k must be at most the vocabulary size {V}, got {cfg.k}")
    teacher, teacher_info = load_teacher(cfg.teacher, V, T, env)
    meta = dict(format='rskd-cache', version=1, method=cfg.method, vocab_size=V, block_size=T, num_seqs=S,
                seed=cfg.seed, split=cfg.split, teacher=teacher_info,
                data=data_fingerprint(tokens, os.path.join(cfg.data_dir, f'{cfg.split}.bin'), env),
                ids_dtype='uint16' if V <= 65536 else 'int32', dtype=env.dtype, device=env.type,
                complete=False, seqs_done=0, entries=0,
                **(dict(rounds=cfg.rounds, sampler=cfg.sampler) if cfg.method == 'rs' else dict(k=cfg.k)))
    meta_path = os.path.join(cfg.cache_dir, 'meta.json')
    if os.path.exists(meta_path):  # every rank checks, so that all stop together on a mismatch
        old = read_cache_meta(cfg.cache_dir)
        for key in meta:
            a, b = old.get(key), meta[key]
            if key not in PROGRESS and (a.get('sha256') != b['sha256'] if key in ('teacher', 'data') else a != b):
                die(f"{cfg.cache_dir} holds a cache made with a different {key} ({a} vs now {b}): use another "
                    f"--cache_dir, or delete it to start over")
        if old['complete']:
            cache_memmaps(cfg.cache_dir, old)
            if env.master:
                print(f"{cfg.cache_dir} is complete ({S} sequences): nothing to do")
            return None
        meta = old
    files = {name: (os.path.join(cfg.cache_dir, f'{name}.bin'), dt, n) for name, (dt, n) in cache_files(meta).items()}
    if env.master:
        os.makedirs(cfg.cache_dir, exist_ok=True)
        for name, (path, dt, n) in files.items():
            if not meta['seqs_done']:  # a new cache: empty files, and the first sequence starts at entry 0
                with open(path, 'wb') as f:
                    f.write(np.zeros(n, dt).tobytes())
            elif os.path.exists(path) and os.path.getsize(path) >= n * np.dtype(dt).itemsize:
                with open(path, 'r+b') as f:  # resume: cut any tail written after the last commit
                    f.truncate(n * np.dtype(dt).itemsize)
            else:
                die(f"{path} is shorter than {meta_path} says: the cache is damaged; delete {cfg.cache_dir}")
        if meta['seqs_done']:
            print(f"resuming {cfg.cache_dir} at sequence {meta['seqs_done']}/{S}")
        else:
            write_json(meta, meta_path)
    if env.ddp:
        dist.barrier()
    # unbuffered: a failed commit leaves no bytes in Python's buffers, to land later behind a resume
    handles = {name: open(path, 'ab', buffering=0) for name, (path, dt, n) in files.items()} if env.master else {}
    start, t0, last_print = meta['seqs_done'], time.time(), 0
    for lo in range(start, S, B * env.world):  # a round: rank r takes the chunk lo + r*B .. lo + (r+1)*B
        seqs = list(range(lo + env.rank * B, min(lo + (env.rank + 1) * B, S)))
        part = cache_batch(teacher, get_batch(tokens, seqs, T, env)[0], seqs, cfg, env) if seqs else None
        parts = [part]
        if env.ddp:
            parts = [None] * env.world if env.master else None
            dist.gather_object(part, parts, dst=0)
        if not env.master:
            continue
        try:
            for part in filter(None, parts):  # in rank order = sequence order
                if cfg.method == 'rs':  # each sequence's entries start where the previous one's end
                    per_seq = part['lengths'].reshape(-1, T).sum(1, dtype=np.uint64)
                    part['seq_offsets'] = meta['entries'] + np.cumsum(per_seq, dtype=np.uint64)
                for name, f in handles.items():
                    data = memoryview(part[name].astype(files[name][1]).tobytes())
                    while data:  # an unbuffered write may take only part
                        data = data[f.write(data):]
                meta['entries'] += len(part['ids'])
            for f in handles.values():  # the data first, then the commit: meta.json never runs ahead
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            die(f"writing {cfg.cache_dir} failed ({e.strerror}); it is intact up to sequence {meta['seqs_done']}: "
                f"free space and rerun the same command to resume")
        meta['seqs_done'] = min(lo + B * env.world, S)
        meta['complete'] = meta['seqs_done'] == S
        write_json(meta, meta_path)
        now = time.time()
        if now - last_print > 5 or meta['complete']:
            last_print, done = now, (meta['seqs_done'] - start) * T
            print(f"cache {meta['seqs_done'] * T:,}/{S * T:,} positions  {done / (now - t0):,.0f} tok/s  "
                  f"ETA {(S - meta['seqs_done']) * T / max(done / (now - t0), 1e-9):.0f}s", flush=True)
    sync(env)
    tok_s = (S - start) * T / (time.time() - t0)
    if env.master:
        for f in handles.values():
            f.close()
        P = S * T
        size = sum(os.path.getsize(p) for p, _, _ in files.values())
        stats = f"{meta['entries'] / P:.2f} unique tokens/position, " if cfg.method == 'rs' else ""
        print(f"cache complete: {cfg.cache_dir}, {P:,} positions, {stats}{size / P:.2f} bytes/position, "
              f"{size / 1e6:.1f} MB, {tok_s:,.0f} tok/s")
    return tok_s


def open_cache(cfg, loss, tokens, V, env):
    """Check a cache against this run and return (meta, targets) where targets(seqs) gives the batch's
    padded (B, T, K) ids and weights, read from the memory-mapped files: only those sequences' rows."""
    meta = read_cache_meta(cfg.cache_dir)
    T, fix = cfg.block_size, f"make a matching one with --mode cache --cache_dir {cfg.cache_dir}"
    want = 'rs' if loss == 'rskd' else 'topk'
    if meta['method'] != want:
        die(f"{cfg.cache_dir} is a {meta['method']} cache, --loss {loss} needs a {want} cache: pass another --cache_dir")
    if not meta['complete']:
        die(f"{cfg.cache_dir} is incomplete ({meta['seqs_done']}/{meta['num_seqs']} sequences): rerun --mode cache to finish it")
    if meta['block_size'] != T:
        die(f"{cfg.cache_dir} was made with block_size {meta['block_size']}, this run uses {T}: pass --block_size {meta['block_size']}")
    if meta['vocab_size'] != V or meta['split'] != 'train':
        die(f"{cfg.cache_dir} holds {meta['split']} targets over {meta['vocab_size']} tokens, not train over {V}: {fix}")
    data = data_fingerprint(tokens, os.path.join(cfg.data_dir, 'train.bin'), env)
    if (meta['data']['n_tokens'], meta['data']['sha256']) != (data['n_tokens'], data['sha256']):
        die(f"{cfg.cache_dir} was made from other training data ({meta['data']['n_tokens']:,} tokens of "
            f"{meta['data']['path']}, this run uses {data['n_tokens']:,}; check --data_dir and --max_seqs): {fix}")
    mm = cache_memmaps(cfg.cache_dir, meta)

    def targets(seqs):
        if meta['method'] == 'topk':
            K = meta['k']
            rows = [slice(s * T * K, (s + 1) * T * K) for s in seqs]
            ids = torch.from_numpy(np.stack([mm['ids'][r] for r in rows]).astype(np.int64))
            w = torch.from_numpy(np.stack([mm['probs'][r] for r in rows]).astype(np.float32))
        else:
            lo, hi = mm['seq_offsets'][seqs], mm['seq_offsets'][np.asarray(seqs) + 1]
            lengths = torch.from_numpy(np.concatenate([mm['lengths'][s * T:(s + 1) * T] for s in seqs]))
            ids = torch.from_numpy(np.concatenate([mm['ids'][a:b] for a, b in zip(lo, hi)]).astype(np.int64))
            counts = torch.from_numpy(np.concatenate([mm['counts'][a:b] for a, b in zip(lo, hi)]))
            ids, w = pad_rows(lengths, ids, counts.float() / meta['rounds'])
        if env.type == 'cuda':  # copied while the GPU is busy with the previous step
            ids, w = ids.pin_memory(), w.pin_memory()
        return tuple(t.view(len(seqs), T, -1).to(env.device, non_blocking=True) for t in (ids, w))
    return meta, targets

# -----------------------------------------------------------------------------
# teacher and train modes: one training loop, cross-entropy or distillation


def make_loss(loss, cfg, env, teacher=None):
    """loss_fn(logits, x, y, (ids, w)) -> the scalar to minimise for this run's --loss; (ids, w) are the
    batch's sparse targets from the cache (rskd, topk)."""
    def loss_fn(logits, x, y, sparse):
        if loss == 'ce':
            return ce_loss(logits, y)
        if loss == 'fullkd':  # the teacher runs online on the same batch, frozen, under the same autocast
            with torch.no_grad(), env.ctx:
                teacher_logits = teacher(x)
            kd = full_kd_loss(logits, teacher_logits)
        else:
            ids, w = sparse
            ghost = loss == 'topk' and cfg.topk_tail == 'ghost'
            kd = ghost_kd_loss(logits, ids, w) if ghost else sparse_kd_loss(logits, ids, w)
        return kd + cfg.alpha * ce_loss(logits, y) if cfg.alpha else kd
    return loss_fn


def run_train(cfg, env, ckpt=None):
    loss_name = 'ce' if cfg.mode == 'teacher' else cfg.loss
    tokens, S, V = load_split(cfg, 'train', env, cfg.max_seqs)
    val, S_val, _ = load_split(cfg, 'val', env)
    T, B = cfg.block_size, cfg.batch_size
    if cfg.gradient_accumulation_steps % env.world:
        die(f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps} must be a multiple of the "
            f"{env.world} ranks")
    G = cfg.gradient_accumulation_steps // env.world  # micro-steps per rank
    if B * cfg.gradient_accumulation_steps > S:
        die(f"one step takes {B * cfg.gradient_accumulation_steps} sequences, the data has {S} of {T} tokens: "
            f"use a smaller --batch_size or --gradient_accumulation_steps")
    # the teacher: needed by fullkd; for the other losses it only feeds the kl_teacher/spec_accept metrics
    teacher, targets, names = None, None, []
    if loss_name in ('rskd', 'topk'):
        cache_meta, targets = open_cache(cfg, loss_name, tokens, V, env)
        names = [cache_meta['teacher']['name'], cfg.teacher]  # where the cache came from, else --teacher
    elif cfg.mode == 'train':
        names = [cfg.teacher]
    hf_ok = importlib.util.find_spec('transformers') is not None
    found = [n for n in names if (n in HF_TEACHERS and hf_ok) or os.path.exists(n)]
    if found or loss_name == 'fullkd':
        teacher, info = load_teacher((found or names)[0], V, T, env)
        if targets and info['sha256'] != cache_meta['teacher']['sha256']:
            die(f"teacher {info['name']} is not the one {cfg.cache_dir} was made from: pass that one with --teacher")
    elif names and env.master:
        print(f"note: teacher {names[-1]} not found, so no kl_teacher/spec_accept metrics")

    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))
    model.to(env.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.95), env.type)
    scaler = torch.amp.GradScaler(env.type, enabled=env.dtype == 'float16')  # fp16 only; bf16 needs none
    it, best_val_loss = 0, float('inf')
    if ckpt:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        torch.set_rng_state(ckpt['rng'])
        it, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
    raw_model = model  # checkpoints hold the plain model: no _orig_mod. or module. prefixes
    if env.compile:
        model = torch.compile(model)
        teacher = torch.compile(teacher) if teacher is not None else None
    train_model = model
    if env.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(model, device_ids=[torch.device(env.device).index] if env.type == 'cuda' else None)
    loss_fn = make_loss(loss_name, cfg, env, teacher)
    val_seqs = np.unique(np.linspace(0, S_val - 1, min(cfg.eval_iters * B, S_val)).round().astype(int)).tolist()
    ckpt_path, metrics_path = os.path.join(cfg.out_dir, 'ckpt.pt'), os.path.join(cfg.out_dir, 'metrics.jsonl')
    if env.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if not ckpt:
            open(metrics_path, 'w').close()
        print(f"{cfg.mode} ({loss_name}): {raw_model.num_params() / 1e6:.1f}M parameters, {S:,} sequences of {T}, "
              f"{B * T * cfg.gradient_accumulation_steps:,} tokens per step, {env.device} {env.dtype}"
              f"{', compiled' if env.compile else ''}{f', {env.world} ranks' if env.ddp else ''}")

    def save(it):
        state = dict(model=raw_model.state_dict(), model_config=asdict(raw_model.config),
                     optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=torch.get_rng_state(),
                     iter_num=it, seqs_seen=it * B * cfg.gradient_accumulation_steps,
                     best_val_loss=best_val_loss, config=asdict(cfg))
        save_atomic(lambda f: torch.save(state, f), ckpt_path)

    stop = []  # Ctrl-C (or a SIGTERM) asks the loop to finish its step, save and exit; a second one kills
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in handlers:
        signal.signal(sig, lambda sig, frame: (stop.append(1), signal.signal(sig, handlers[sig])))
    lr_decay_iters = cfg.lr_decay_iters or cfg.max_iters
    start, train_time, train_tokens, lossf, m = it, 0.0, 0, None, {}
    try:
        while True:
            if (it == cfg.max_iters or it % cfg.eval_interval == 0) and not (ckpt and it == start):
                m = evaluate(model, teacher, val, val_seqs, cfg, env)
                if not math.isfinite(m['val_loss']):
                    die(f"the val loss is {m['val_loss']} at iter {it}: not saved, {ckpt_path} holds the last good state")
                if env.master:
                    best_val_loss = min(best_val_loss, m['val_loss'])
                    save(it)  # first the checkpoint, then the line that reports it
                    rec = dict(iter=it, loss=loss_name, seed=cfg.seed, train_loss=lossf,
                               tok_s=train_tokens / train_time if train_time else None, **m)
                    with open(metrics_path, 'a') as f:
                        f.write(json.dumps(rec) + '\n')
                    print(f"eval {it}: " + ', '.join(f"{k} {v:.4f}" for k, v in m.items() if k != 'reliability'))
            if it >= cfg.max_iters:
                break
            if env.ddp:  # every rank must stop at the same step
                flag = torch.tensor(float(bool(stop)), device=env.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = [1] if flag.item() else []
            if stop:
                if env.master:
                    save(it)
                    print(f"interrupted: saved {ckpt_path} at iter {it}. Resume with the same command plus --resume true")
                return
            # cosine learning rate with linear warmup
            if it < cfg.warmup_iters:
                lr = cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
            else:
                ratio = min(1.0, (it - cfg.warmup_iters) / max(1, lr_decay_iters - cfg.warmup_iters))
                lr = cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)
            for group in optimizer.param_groups:
                group['lr'] = lr
            t0 = time.time()
            loss_sum = torch.zeros((), device=env.device)
            for micro in range(G):
                n = (it * G + micro) * env.world + env.rank  # this micro-batch's number, counted over all ranks
                seqs = draw_seqs(S, cfg.seed, n * B, B)
                x, y = get_batch(tokens, seqs, T, env)
                sparse = targets(seqs) if targets else None
                if env.ddp:  # sync gradients only on the last micro-step (set before the forward pass)
                    train_model.require_backward_grad_sync = micro == G - 1
                with env.ctx:
                    logits = train_model(x)  # (B, T, V)
                loss = loss_fn(logits, x, y, sparse) / G
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
            if env.ddp:  # the mean over ranks (gloo has no AVG)
                dist.all_reduce(loss_sum)
                loss_sum /= env.world
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float('inf'))
            lossf, grad_normf = torch.stack([loss_sum, grad_norm.to(loss_sum)]).tolist()  # one sync
            # never step on a NaN (fp16's GradScaler skips overflowed steps by itself): stop, the last
            # checkpoint stays the last good state
            if not math.isfinite(lossf) or (not scaler.is_enabled() and not math.isfinite(grad_normf)):
                die(f"the loss became {lossf} (gradient norm {grad_normf}) at iter {it}; stopped before the update, "
                    f"{ckpt_path} holds the last good state. Lower --learning_rate or check the data and cache")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            it += 1
            dt = time.time() - t0
            if it > start + 1:  # the first step warms up (and compiles): leave it out of the throughput
                train_time, train_tokens = train_time + dt, train_tokens + B * T * G * env.world
            if env.master and (it % cfg.log_interval == 0 or it == cfg.max_iters):
                tok_s = B * T * G * env.world / dt
                mfu = ''
                peak = next((v for k, v in dict(H100=989e12, H200=989e12, A100=312e12).items()
                             if env.type == 'cuda' and k in torch.cuda.get_device_name()), None)
                if peak:
                    mfu = f", mfu {raw_model.flops_per_token() * tok_s / env.world / peak:.1%}"
                eta = (cfg.max_iters - it) * (train_time / max(it - start - 1, 1) if train_time else dt)
                print(f"iter {it}/{cfg.max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms, "
                      f"{tok_s:,.0f} tok/s{mfu}, ETA {eta:.0f}s", flush=True)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if env.master and m:
        print(f"done: {cfg.out_dir} " + ', '.join(f"{k} {v:.4f}" for k, v in m.items() if k != 'reliability') +
              (f", train {train_tokens / train_time:,.0f} tok/s" if train_time else ''))

# -----------------------------------------------------------------------------
# bench mode: step time, memory, cache throughput and gradient fidelity, side by side in one process


def run_bench(cfg, env):
    tokens, S, V = load_split(cfg, 'train', env)
    T, B = cfg.block_size, cfg.batch_size
    if B > S:
        die(f"--batch_size {B} is more than the {S} sequences of {T} tokens in the data: use a smaller one")
    # the gradient-fidelity student: OUT_DIR/ckpt.pt when there is one (a trained student, as in the paper)
    student_path = os.path.join(cfg.out_dir, 'ckpt.pt')
    ckpt = load_checkpoint(student_path) if os.path.exists(student_path) else None
    if ckpt and (ckpt['model_config']['vocab_size'] != V or ckpt['model_config']['block_size'] < T):
        die(f"{student_path} is a student for vocab {ckpt['model_config']['vocab_size']} and block_size "
            f"{ckpt['model_config']['block_size']}, this bench has {V} and {T}: use another --out_dir")
    teacher, _ = load_teacher(cfg.teacher, V, T, env)
    n = min(S, 4 * B)  # the sequences that the caching runs cover
    os.makedirs(cfg.out_dir, exist_ok=True)

    # caching: the bare teacher forward vs --mode cache itself, over the same sequences, interleaved
    batches = [get_batch(tokens, range(i, min(i + B, n)), T, env)[0] for i in range(0, n, B)]

    @torch.no_grad()
    def bare_forward():
        t0 = time.time()
        for x in batches:
            with env.ctx:
                teacher(x)
        sync(env)
        return n * T / (time.time() - t0)
    bare_forward()  # warm-up
    caches = {m: os.path.join(cfg.out_dir, f'bench-cache-{m}') for m in ('rs', 'topk')}
    runs = dict(fwd=[], rs=[], topk=[])  # tok/s of every run
    for _ in range(5):  # each cache run right after a bare forward run: the pair's ratio cancels slow drift
        for method, d in caches.items():
            runs['fwd'].append(bare_forward())
            shutil.rmtree(d, ignore_errors=True)
            runs[method].append(run_cache(replace(cfg, method=method, cache_dir=d, max_seqs=n, split='train'), env))
    speed = {k: float(np.median(v)) for k, v in runs.items()}
    ratio = {m: float(np.median(np.divide(runs[m], runs['fwd'][i::2]))) for i, m in enumerate(caches)}

    # gradient fidelity on one batch: each sparse target's gradient vs full KD's, w.r.t. the student's
    # logits (where sampling noise is per position) and w.r.t. its weights (a sum over the batch's
    # positions: independent noise averages out there, a bias does not). The student is the trained one
    # from OUT_DIR/ckpt.pt, else a freshly initialised model.
    seqs = list(range(B))
    x, y = get_batch(tokens, seqs, T, env)
    torch.manual_seed(cfg.seed)
    if ckpt:
        student = GPT(GPTConfig(**ckpt['model_config']))
        student.load_state_dict(ckpt['model'])
    else:
        student = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))
    student.to(env.device)
    with torch.no_grad(), env.ctx:
        t_logits = teacher(x).float()
    probs = torch.softmax(t_logits, dim=-1)
    with env.ctx:
        s_logits = student(x).float()  # one graph, reused by every variant
    params = list(student.parameters())

    def grads(loss):  # -> (d loss / d logits, d loss / d weights), each flattened
        g_logits, = torch.autograd.grad(loss, s_logits, retain_graph=True)
        g_params = torch.autograd.grad(s_logits, params, g_logits, retain_graph=True)
        return g_logits.flatten(), torch.cat([g.flatten() for g in g_params])

    def rs(rounds, sampler):  # -> (ids, weights, unique tokens per position)
        gens = seq_generators(cfg.seed, seqs, env.device)
        lengths, ids, counts = run_lengths(sample_draws(probs, rounds, gens, sampler))
        ids, w = pad_rows(lengths, ids, counts / rounds)
        return ids.view(B, T, -1), w.view(B, T, -1), len(counts) / (B * T)
    unique = dict(rskd=rs(cfg.rounds, 'multinomial')[2])
    lo, hi = 1, cfg.rounds  # systematic rounds with the storage of multinomial: unique grows with rounds
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if rs(mid, 'systematic')[2] < unique['rskd'] else (lo, mid)
    r_eq = min((lo - 1, lo), key=lambda r: abs(rs(r, 'systematic')[2] - unique['rskd']) if r else 1e9)
    targets = {'rskd': rs(cfg.rounds, 'multinomial'), f'systematic{cfg.rounds}': rs(cfg.rounds, 'systematic'),
               f'systematic{r_eq}': rs(r_eq, 'systematic')}
    unique.update({k: v[2] for k, v in targets.items()})
    variants = {k: sparse_kd_loss(s_logits, *v[:2]) for k, v in targets.items()}
    for k in (12, 50):
        top = probs.topk(k, dim=-1)
        variants[f'topk{k}'] = sparse_kd_loss(s_logits, top.indices, top.values)
        if k == 12:
            variants['ghost12'] = ghost_kd_loss(s_logits, top.indices, top.values)
    full = grads(full_kd_loss(s_logits, t_logits))
    fidelity = {}
    for name, loss in variants.items():
        for wrt, g, g_full in zip(('logits', 'weights'), grads(loss), full):
            cos = (g @ g_full / (g.norm() * g_full.norm())).clamp(-1, 1).item()
            fidelity.setdefault(f'grad_angle_deg_{wrt}', {})[name] = math.degrees(math.acos(cos))
            fidelity.setdefault(f'grad_norm_ratio_{wrt}', {})[name] = (g.norm() / g_full.norm()).item()
    del t_logits, s_logits, probs, variants

    # training steps: one model, one batch, the methods interleaved (A B C D E A B C D E ...) so drift cancels
    model = torch.compile(student) if env.compile else student
    teacher_c = torch.compile(teacher) if env.compile else teacher
    optimizer = student.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.95), env.type)
    vanilla = replace(cfg, topk_tail='none', alpha=0.0, max_seqs=n)
    readers = {loss: open_cache(replace(vanilla, cache_dir=caches[m]), loss, tokens[:n * T + 1], V, env)[1]
               for loss, m in (('rskd', 'rs'), ('topk', 'topk'))}
    readers['ghost'] = readers['topk']
    names = ['ce', 'rskd', 'topk', 'ghost', 'fullkd']
    losses = {k: make_loss(k, vanilla, env, teacher_c) for k in names if k != 'ghost'}
    losses['ghost'] = make_loss('topk', replace(vanilla, topk_tail='ghost'), env, teacher_c)
    times, mem = {k: [] for k in names}, {k: 0 for k in names}
    for rep in range(2 + 2 * len(names)):  # the order rotates each round: every rotation is timed twice
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            base = peak_memory_reset(env)
            t0 = time.time()
            sparse = readers[name](seqs) if name in readers else None  # the batch's cache rows, as in training
            with env.ctx:
                logits = model(x)
            losses[name](logits, x, y, sparse).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del logits
            sync(env)
            if rep >= 2:  # two warm-up rounds
                times[name].append(time.time() - t0)
                mem[name] = max(mem[name], peak_memory(env) - base)
    step_ms = {k: 1000 * float(np.median(v)) for k, v in times.items()}
    res = dict(device=torch.cuda.get_device_name() if env.type == 'cuda' else env.device, dtype=env.dtype,
               compile=env.compile, model=dict(student=asdict(student.config), teacher=asdict(teacher.config),
                                               batch_size=B),
               step_ms=step_ms, step_ratio_vs_ce={k: v / step_ms['ce'] for k, v in step_ms.items()},
               tok_s={k: B * T / v * 1000 for k, v in step_ms.items()},
               peak_mem_bytes=mem, peak_mem_kind='cuda max allocated' if env.type == 'cuda' else 'RSS peak growth during the step',
               teacher_fwd_tok_s=speed['fwd'], cache_tok_s=dict(rs=speed['rs'], topk=speed['topk']),
               cache_ratio_vs_fwd=ratio, cache_runs_tok_s=runs,
               grad_angle_deg=fidelity['grad_angle_deg_logits'], grad_norm_ratio=fidelity['grad_norm_ratio_logits'],
               **fidelity, unique_per_position=unique, systematic_equal_storage_rounds=r_eq,
               fidelity_student=student_path if ckpt else 'random init')
    write_json(res, os.path.join(cfg.out_dir, 'bench.json'))
    print(f"\nbench on {res['device']} ({env.dtype}{', compiled' if env.compile else ''}), batch {B}x{T}")
    print(f"{'method':8} {'step ms':>9} {'vs ce':>6} {'tok/s':>8} {'peak MB':>8}   ({res['peak_mem_kind']})")
    for k in names:
        print(f"{k:8} {step_ms[k]:9.1f} {res['step_ratio_vs_ce'][k]:6.3f} {res['tok_s'][k]:8,.0f} {mem[k] / 2**20:8.0f}")
    print(f"teacher forward {speed['fwd']:,.0f} tok/s; cache rs {speed['rs']:,.0f} tok/s ({ratio['rs']:.2f}x), topk "
          f"{speed['topk']:,.0f} tok/s ({ratio['topk']:.2f}x); x: the median of 5 cache runs / the forward run before each")
    print(f"gradient vs full KD (student: {res['fidelity_student']})\n{'':16} {'unique':>6}  {'logits: angle':>13}"
          f" {'norm':>5}  {'weights: angle':>14} {'norm':>5}")
    for k in fidelity['grad_angle_deg_logits']:
        print(f"{k:16} {unique.get(k, float('nan')):6.1f}  " + '  '.join(
            f"{fidelity[f'grad_angle_deg_{w}'][k]:12.1f}° {fidelity[f'grad_norm_ratio_{w}'][k]:5.2f}" for w in ('logits', 'weights')))
    print(f"wrote {os.path.join(cfg.out_dir, 'bench.json')}")


def peak_memory_reset(env):
    if env.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        return 0
    try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        return 0
    return peak_memory(env)


def peak_memory(env):
    if env.type == 'cuda':
        return torch.cuda.max_memory_allocated()
    try:
        with open('/proc/self/status') as f:
            return 1024 * int(re.search(r'VmHWM:\s+(\d+)', f.read()).group(1))
    except OSError:
        return 0

# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    mode = args.get('mode', Config.mode)
    base = dict(TEACHER) if mode == 'teacher' else {}
    ckpt = None
    if mode in ('teacher', 'train'):
        ckpt_path = os.path.join(args.get('out_dir', base.get('out_dir', Config.out_dir)), 'ckpt.pt')
        if args.get('resume'):  # the saved run's config, then whatever this command line changes
            ckpt = load_checkpoint(ckpt_path)
            base.update({k: v for k, v in ckpt['config'].items() if k in Config.__dataclass_fields__})
            changed = [k for k in RESUME_FIXED if k in args and args[k] != base.get(k)]
            if changed:
                die(f"a resumed run keeps its {', '.join(changed)}: drop them from the command line")
        elif os.path.exists(ckpt_path):
            die(f"{ckpt_path} already exists: continue it with --resume true, or use another --out_dir")
    world = int(os.environ.get('WORLD_SIZE', 1))
    if mode == 'bench' and 'RANK' in os.environ:
        die("--mode bench measures one process: run it with python, not torchrun")
    if world > 1 and not ckpt and 'gradient_accumulation_steps' not in args:
        args['gradient_accumulation_steps'] = world  # under torchrun: one micro-step per rank by default
    cfg = Config(**{**base, **args})
    check_config(cfg)
    env = setup(cfg)
    try:
        if mode in ('teacher', 'train'):
            run_train(cfg, env, ckpt)
        elif mode == 'cache':
            run_cache(cfg, env)
        else:
            run_bench(cfg, env)
    except KeyboardInterrupt:  # before training's own handler is set, or in cache mode
        die("interrupted" + (": rerun the same command to resume the cache" if mode == 'cache' else ""))
    except OSError as e:  # a full disk or a folder we may not write, anywhere not handled more precisely
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        die(f"{e.strerror}: {e.filename or 'writing ' + (cfg.cache_dir if mode == 'cache' else cfg.out_dir)}; "
            f"fix that and rerun the same command (finished work is kept)")
    finally:
        if env.ddp:
            # free DDP (and the gloo work it holds) while Python is fully alive: left to interpreter
            # shutdown, a gloo worker can abort the process after the run has finished
            gc.collect()
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
