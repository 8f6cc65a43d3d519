"""
The guard rails of rskd.py, which a reader of the method need not see:
the command line and its checks, the run's environment, one integrity
rule (every file rskd writes records the crc32 of its contents, and
every read checks it before use), atomic writes, checkpoint, teacher
and cache I/O (as each rskd.FORMATS entry describes its files), one
lock per output folder, and one error boundary per entry point (and a
Ctrl-C or SIGTERM while the modules load is one line too).

A problem the user can fix calls die(): one line, what to do, exit 1.
"""
import argparse
import fcntl
import gc
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import signal
import sys
import threading
import time
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, field, fields, replace
from types import SimpleNamespace

def interrupted_while_starting(sig, frame):
    """Ctrl-C or SIGTERM in the second or two before entry_point, while
    torch loads: one line, not Python's traceback or silence; nothing was
    done yet."""
    print(f"interrupted ({signal.Signals(sig).name}) while starting: nothing "
          f"was done", file=sys.stderr, flush=True)
    os._exit(128 + sig)

# for the scripts beside this file, which import it before torch; not for
# a program that imports them (pytest, a notebook): it keeps its own
MAIN = getattr(sys.modules['__main__'], '__file__', None)
if MAIN and os.path.dirname(os.path.realpath(MAIN)) == os.path.dirname(os.path.realpath(__file__)):
    for early in (signal.SIGINT, signal.SIGTERM):
        signal.signal(early, interrupted_while_starting)

import numpy as np  # noqa: E402 (after the handler)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model import GPT, GPTConfig  # noqa: E402

HF_TEACHERS = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
# a resumed run keeps these, or its data order or model would change
RESUME_FIXED = ('mode', 'n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size',
                'gradient_accumulation_steps', 'max_seqs', 'seed', 'loss', 'cache_dir')

def die(msg):
    """A problem the user can fix: one line, no traceback, exit 1. After a
    signal, every failure is part of the stop (a load it broke, say)."""
    still_running()
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)

def first_line(e):
    return (str(e).splitlines() or [type(e).__name__])[0]

def in_collective(e):
    """A collective's failure (a rank that another's exit left waiting
    in a gather, an all_reduce or DDP's backward)? gloo and NCCL raise a
    RuntimeError from inside torch.distributed, or from the backward."""
    frames, tb = [], e.__traceback__
    while tb:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    where = any(os.path.join('torch', 'distributed') in f for f in frames)
    said = re.search(r'gloo|NCCL|ProcessGroup|Connection (closed|reset) by peer', str(e))
    return isinstance(e, RuntimeError) and bool(where or said)

# ---- the command line and the config ---------------------------------------------------

def boolean(s):
    if s.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(s)
    return s.lower() in ('true', '1')

class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        die(f"{message} (see --help)")

def opt(default, help, choices=None):
    """A Config field that carries its --help text and choices."""
    return field(default=default, metadata=dict(help=help, choices=choices))

def parse_args(config_cls, argv, teacher_defaults, description):
    """The options given, as a dict: one --option per Config field."""
    p = OneLineParser(description=description,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(config_cls):
        extra = f" [teacher: {teacher_defaults[f.name]}]" if f.name in teacher_defaults else ""
        flag = dict(nargs='?', const=True) if f.type is bool else {}  # --resume: true
        choices = f.metadata.get('choices')
        listed = f" ({' | '.join(choices)})" if choices else ""
        p.add_argument(f'--{f.name}', type=boolean if f.type is bool else f.type,
                       default=None, **flag, choices=choices, metavar=f.type.__name__.upper(),
                       help=f"{f.metadata['help']}{listed} (default: {f.default}){extra}")
    return {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}

def resolve_config(config_cls, args, teacher_defaults, formats, objectives):
    """(cfg, a checkpoint to resume): defaults < resumed < command line."""
    mode = args.get('mode', config_cls.mode)
    base = dict(teacher_defaults) if mode == 'teacher' else {}
    ckpt, out_dir = None, args.get('out_dir', base.get('out_dir', config_cls.out_dir))
    if mode in ('teacher', 'train'):
        ckpt_path = os.path.join(out_dir, 'ckpt.pt')
        if args.get('resume'):
            ckpt = load_checkpoint(ckpt_path)
            base.update({k: v for k, v in ckpt['config'].items()
                         if k in config_cls.__dataclass_fields__})
            changed = [k for k in RESUME_FIXED if k in args and args[k] != base.get(k)]
            if changed:
                die(f"a resumed run keeps its {', '.join(changed)}: drop them")
        elif os.path.lexists(ckpt_path):
            die(f"{ckpt_path} already exists: continue it with --resume true, "
                f"or use another --out_dir")
    if mode in ('teacher', 'train') and args.get('init_from', 'scratch') != 'scratch' and not ckpt:
        shape = gpt_source(args['init_from'])[0]  # the student's shape comes from it
        for k in ('n_layer', 'n_head', 'n_embd'):
            if args.setdefault(k, shape[k]) != shape[k]:
                die(f"--{k} {args[k]}: --init_from {args['init_from']} has {k} {shape[k]}: drop it")
    if mode in ('bench', 'verify') and 'RANK' in os.environ:
        die(f"--mode {mode} runs in one process: run it with python, not torchrun")
    if not ckpt and not args.get('gradient_accumulation_steps'):  # 0: one a rank
        args['gradient_accumulation_steps'] = int(os.environ.get('WORLD_SIZE', 1))
    cfg = config_cls(**{**base, **args})
    for method in formats:  # a fork's broken entry is named, whatever the run
        check_format(method, formats, config_cls, objectives)
    if mode == 'cache' and cfg.method not in formats:
        die(f"argument --method: invalid choice: {cfg.method!r} (choose from "
            f"{', '.join(formats)}) (see --help)")
    if cfg.loss not in objectives:
        raise RuntimeError(f"--loss {cfg.loss} has no OBJECTIVES entry: add one")
    check_config(cfg, {f['loss'] for f in formats.values()})
    return cache_decides(cfg, args, formats), ckpt

def cache_decides(cfg, args, formats):
    """Options that shape a cache: another method's are refused in cache
    mode; in training the cache's are taken (and printed), others refused."""
    options = {'method', 'split', 'compress'}.union(*(f['options'] for f in formats.values()))
    given = sorted(options & set(args))
    cached = cfg.mode == 'train' and cfg.loss in {f['loss'] for f in formats.values()}
    for k in given if cfg.mode == 'cache' else []:  # it would do nothing
        others = [m for m, f in formats.items() if k in f['options']
                  and k not in formats[cfg.method]['options']]
        if others:
            die(f"--{k} is an option of --method {' or '.join(others)}, not {cfg.method}: "
                f"drop it, or pass --method {others[0]}")
    if given and cfg.mode in ('teacher', 'train') and not cached:
        die(f"--{given[0]} shapes a cache, and this run reads none: drop it")
    if not cached or not os.path.isfile(os.path.join(cfg.cache_dir, 'meta.json')):
        return cfg  # (a missing cache is named once the data is checked)
    meta = read_cache_meta(cfg.cache_dir, formats)
    taken = {k: meta[k] for k in ('method', 'split', 'compress', *formats[meta['method']]['options'])}
    for k in given:
        if taken.get(k) != args[k]:
            die(f"--{k} {args[k]}: training takes its targets' options from the cache, "
                f"and {cfg.cache_dir} was made with {k} {taken.get(k, '(none)')}: drop --{k}")
    if os.environ.get('RANK', '0') == '0':
        print(f"from {cfg.cache_dir}: " + ', '.join(f"{k} {v}" for k, v in taken.items()))
    return replace(cfg, **taken)

# the ranges of numbers, on the command line and in the files that record them
RANGES = [('seed', 0, 2 ** 64 - 1, "between 0 and 2**64"),
          ('rounds', 1, 255, "1..255 (counts are stored as uint8)"),
          ('proposal_temperature', math.ulp(0), math.inf, "a positive number"),
          ('vocab_size', 1, 65536, "1..65536 (tokens are uint16)")]
RANGES += [(n, 1, math.inf, "at least 1") for n in (
    'batch_size', 'block_size', 'n_layer', 'n_head', 'n_embd', 'eval_interval', 'eval_iters',
    'log_interval', 'k')]
RANGES += [('gradient_accumulation_steps', 1, math.inf, "at least 1 (or 0: one per rank)")]
RANGES += [(n, 0, math.inf, "at least 0") for n in (
    'max_iters', 'max_seqs', 'alpha', 'learning_rate', 'min_lr', 'warmup_iters',
    'lr_decay_iters', 'weight_decay', 'grad_clip')]

def out_of_range(values, rules=()):
    """(name, what it must be) of the first of values outside RANGES, or of
    the first (name, holds, what) in rules that does not hold; else None."""
    bad = [(n, what) for n, lo, hi, what in RANGES if n in values and not lo <= values[n] <= hi]
    return (bad + [(n, what) for n, holds, what in rules if not holds] or [None])[0]

def check_config(cfg, cached_losses):
    """Each option's value: what die() says if it is out of range."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            die(f"--{f.name} must be a finite number, got {value}")
    cached = cfg.mode in ('cache', 'verify') or (cfg.mode == 'train' and cfg.loss in cached_losses)
    folders = ['data_dir'] + ['cache_dir'] * cached
    for name in folders + ['out_dir'] * (cfg.mode not in ('cache', 'verify')):
        path = getattr(cfg, name)
        if not path or (os.path.lexists(path) and not os.path.isdir(path)):
            die(f"--{name} {path!r} is not a folder (a file, a broken link or "
                f"nothing): pass a folder")
    bad = out_of_range(vars(cfg))
    if bad:
        die(f"--{bad[0]} must be {bad[1]}, got {getattr(cfg, bad[0])}")
    if cfg.n_embd % cfg.n_head:
        die(f"--n_embd {cfg.n_embd} must be a multiple of --n_head {cfg.n_head}")
    loss = 'ce' if cfg.mode == 'teacher' else cfg.loss  # (a remedy for Top-K's tail)
    if cfg.topk_tail != 'none' and loss != 'topk' and cfg.mode in ('teacher', 'train'):
        die(f"--topk_tail changes only --loss topk, not --loss {loss}: drop it")
    if not re.fullmatch(r'auto|cpu|cuda(:\d+)?', cfg.device):
        die(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device}")
    gpus = torch.cuda.device_count()
    if cfg.device.startswith('cuda') and 'RANK' not in os.environ and gpus <= int(cfg.device[5:] or 0):
        die(f"--device {cfg.device}, but this PyTorch sees {gpus} CUDA GPUs: use --device cpu")

# ---- the run's environment -------------------------------------------------------------

def resolve_dtype(dtype, device):
    """auto: float32 on CPU; bfloat16 on GPUs whose tensor cores have it
    (8.0 on), else float16 (is_bf16_supported() counts emulated bf16)."""
    if dtype != 'auto' or not device.startswith('cuda'):
        return 'float32' if dtype == 'auto' else dtype
    return 'bfloat16' if torch.cuda.get_device_capability(device)[0] >= 8 else 'float16'

def setup(cfg):
    """The run's `env` (described in rskd.py)."""
    env = SimpleNamespace(ddp='RANK' in os.environ, rank=0, world=1, device=cfg.device)
    if env.ddp:
        use_cuda = torch.cuda.is_available() and cfg.device != 'cpu'
        if 'LOCAL_RANK' not in os.environ:
            die("RANK is set but LOCAL_RANK is not: start distributed runs with torchrun")
        if cfg.device.startswith('cuda') and not use_cuda:
            die(f"--device {cfg.device}, but this PyTorch sees no CUDA GPU: use --device cpu")
        ranks, gpus = int(os.environ.get('LOCAL_WORLD_SIZE', 1)), torch.cuda.device_count()
        if use_cuda and ranks > gpus:  # every rank stops, before any waits
            die(f"torchrun started {ranks} processes on this machine, which has {gpus} "
                f"GPUs: use --nproc_per_node {gpus}, or --device cpu")
        env.device = f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else 'cpu'
        gpu = dict(device_id=torch.device(env.device)) if use_cuda else {}  # (NCCL: no guessing)
        dist.init_process_group('nccl' if use_cuda else 'gloo', **gpu)
        env.rank, env.world = dist.get_rank(), dist.get_world_size()
    elif cfg.device == 'auto':  # (not mps: it has no float64)
        env.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    env.master, env.device_type = env.rank == 0, env.device.split(':')[0]
    if env.device_type == 'cuda' and torch.device(env.device).index is not None:  # cuda:N
        torch.cuda.set_device(env.device)  # (TF32 stays off: float32 is float32)
    env.name = torch.cuda.get_device_name(env.device) if env.device_type == 'cuda' else env.device
    env.dtype = resolve_dtype(cfg.dtype, env.device)
    # autocast: matmuls in 16 bits; losses, softmaxes, metrics in float32
    env.ctx = nullcontext() if env.dtype == 'float32' else torch.autocast(
        env.device_type, dtype=getattr(torch, env.dtype))
    env.compile = cfg.compile == 'true' or (cfg.compile == 'auto' and env.device_type == 'cuda')
    env.compile = env.compile and compile_works(env, cfg.compile)
    return env

def compile_works(env, choice):
    """Whether torch.compile works here, tried once on a tiny function (a
    missing C compiler or Triton fails at the first compiled call): under
    --compile auto the run goes on uncompiled, under true it stops."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(8, device=env.device))
        return True
    except Exception as e:  # (whatever the compiler raises)
        if choice == 'true':
            die(f"--compile true, but torch.compile fails here ({first_line(e)[:120]}): "
                f"use --compile false, or fix the compiler")
        still_running()  # (a signal broke it, not the compiler)
        if env.master:
            print(f"note: torch.compile fails here ({first_line(e)[:120]}): running uncompiled")
        return False

def check_model_size(cfg, V, env, teacher=None):
    """Refuse a run that won't fit beside what is loaded (on a GPU: the
    teacher). Training: the student's weights, grads and AdamW moments (16
    bytes a parameter) and the float32 (B, T, V) tensors a step holds: 4
    (logits, log-softmax, gradient, a temporary), 7 where a teacher runs
    (its logits and theirs, in fullkd and the evals). Caching: 2 (the
    probabilities; the sampler's work or is's proposal), no student."""
    C, L = cfg.n_embd, cfg.n_layer
    params = (V + 63) // 64 * 64 * C + cfg.block_size * C + L * (12 * C * C + 13 * C) + 2 * C
    params, held = (0, 2) if cfg.mode == 'cache' else (params, 7 if teacher else 4)
    need = 16 * params + held * 4 * cfg.batch_size * cfg.block_size * V
    if env.device_type == 'cuda':
        have = (torch.cuda.get_device_properties(env.device).total_memory
                - torch.cuda.memory_allocated(env.device))
    else:
        have = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    if need > have:
        what = f"a model of {params / 1e6:,.0f}M parameters" if params else "caching"
        die(f"{what} needs about {need / 2**30:,.1f} GiB more, this {env.device_type} has "
            f"{have / 2**30:,.1f}: use a smaller --batch_size (or --n_layer, --n_embd)")

def micro_steps_per_rank(cfg, world, S):
    """Micro-steps per rank; a step must divide among ranks, fit the data."""
    accum = cfg.gradient_accumulation_steps
    if accum % world:
        die(f"--gradient_accumulation_steps {accum} must be a multiple of the {world} ranks")
    if cfg.batch_size * accum > S:
        die(f"one step takes {cfg.batch_size * accum} sequences, the data has {S} of "
            f"{cfg.block_size} tokens: use a smaller --batch_size or "
            f"--gradient_accumulation_steps")
    return accum // world

# ---- one integrity rule for every file rskd reads back, and atomic writes --------------

def need_file(path, what):
    if not os.path.isfile(path):
        die(f"{path} {'is a folder, not a file' if os.path.isdir(path) else 'not found'}: {what}")

def digest(obj, crc=0):
    """crc32 of obj's contents: tensors, numbers, text, in order."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            crc = digest(v, zlib.crc32(repr(k).encode(), crc))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            crc = digest(v, crc)
    elif isinstance(obj, torch.Tensor):
        crc = zlib.crc32(obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy(), crc)
    else:
        crc = zlib.crc32(repr(obj).encode(), crc)
    return crc

def dumps(d, indent=None):
    """d as JSON that carries its own crc32, as all JSON rskd writes."""
    d = json.loads(json.dumps(d))  # (the values as a reader sees them)
    return json.dumps(dict(d, crc32=digest(d)), indent=indent)

def checked_json(text, where, what):
    try:
        d = json.loads(text)
        crc = d.pop('crc32')
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError):
        crc = d = None
    if crc != digest(d):
        die(f"{where} does not match its checksum (damaged, or not written "
            f"by this version of rskd): {what}")
    return d

def read_json(path, what, schema=None):
    """A JSON file of ours, checked: its crc32, then schema's fields."""
    need_file(path, what)
    with open(path, 'rb') as f:
        d = checked_json(f.read(), path, what)
    return check_fields(d, schema, path, what) or d if schema else d

def check_fields(d, schema, where, what, signed=()):
    """d holds exactly schema's fields, of their types; numbers finite,
    and at least 0 but for the names in signed (a format's options)."""
    if not isinstance(d, dict) or set(d) != set(schema):
        have = set(d) if isinstance(d, dict) else set()
        die(f"{where}: missing fields {sorted(set(schema) - have)}, unexpected fields "
            f"{sorted(have - set(schema))}; not written by this version of rskd: {what}")
    for k, kind in schema.items():
        if isinstance(kind, dict):
            check_fields(d[k], kind, f"{where} field '{k}'", what)
        elif not isinstance(d[k], kind) or (kind is int and isinstance(d[k], bool)):
            die(f"{where}: field '{k}' should be {getattr(kind, '__name__', 'a number')}, "
                f"found {d[k]!r}")
        elif isinstance(d[k], (int, float)) and not (
                math.isfinite(d[k]) and (d[k] >= 0 or k in signed)):  # (we write none)
            die(f"{where}: field '{k}' should be a finite number"
                f"{'' if k in signed else ' of at least 0'}, found {d[k]!r}: {what}")

@contextmanager
def replaced(path):
    """A temp file, renamed over path if the block succeeds (fsync'd),
    removed if not: a reader sees the old file or the new one."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(folder)  # the rename, durable too
        os.close(folder)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and not e.filename:
            e.filename = path
        raise

def write_bytes(data, path):  # (a full disk: the old file stays whole)
    with replaced(path) as f:
        f.write(data)

def write_json(d, path):
    write_bytes(dumps(d, indent=1).encode(), path)

# ---- the data --------------------------------------------------------------------------

DATA_META = dict(tokenizer=str, vocab_size=int, eot=int, dtype=str, train_tokens=int,
                 val_tokens=int, train_docs=int, val_docs=int, train_crc32=int,
                 val_crc32=int, val_fraction=(int, float), source=list)
SCANNED = {}  # (path, size, mtime, tokens used) -> sha256 of those tokens

def check_data(data_dir, split, T, max_seqs, env):
    """(split.bin, tokens to use, vocab size), checked: size, crc32, ids."""
    meta = read_json(os.path.join(data_dir, 'meta.json'), "run prepare_data.py", DATA_META)
    path, V = os.path.join(data_dir, f'{split}.bin'), meta['vocab_size']
    bad = out_of_range(meta, [('dtype', meta['dtype'] == 'uint16', "uint16"),
                              ('eot', meta['eot'] < V, "a token id, below vocab_size")])
    if bad:
        die(f"{data_dir}/meta.json: {bad[0]} {meta[bad[0]]!r} is out of range ({bad[1]}): "
            f"it was edited or damaged; run prepare_data.py again")
    need_file(path, "rerun prepare_data.py")
    size = os.path.getsize(path)
    if size != 2 * meta[f'{split}_tokens']:
        die(f"{path} has {size} bytes, meta.json says {meta[f'{split}_tokens']} uint16 "
            f"tokens: rerun prepare_data.py")
    n = min(size // 2, max_seqs * T + 1) if max_seqs else size // 2
    if n < T + 1:
        die(f"{path} holds {n} tokens, fewer than one block of {T}+1: use a smaller "
            f"--block_size or more data")
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, n)
    if key in SCANNED:
        return path, n, V
    # one pass in chunks, never the whole file in RAM. Every rank scans
    # for itself: none waits in a collective (and its timeout) for rank 0
    tokens = np.memmap(path, dtype=np.uint16, mode='r', shape=(size // 2,))
    crc, largest, sha = 0, 0, hashlib.sha256()
    for i in range(0, len(tokens), 1 << 24):
        chunk = tokens[i:i + (1 << 24)]
        crc = zlib.crc32(chunk, crc)
        largest = max(largest, int(chunk.max()))
        sha.update(chunk[:max(n - i, 0)].tobytes())
    if crc != meta[f'{split}_crc32']:
        die(f"{path} does not match the checksum in {data_dir}/meta.json: it is damaged "
            f"(or was changed after prepare_data.py); rerun prepare_data.py")
    if largest >= V:
        die(f"{path} holds token ids >= vocab_size {V}: not made with this tokenizer")
    SCANNED[key] = sha.hexdigest()
    return path, n, V

def tokens_sha256(path, n):
    """The sha256 of a .bin file's first n tokens (check_data's pass made most)."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, n)
    if key not in SCANNED:
        h, tokens = hashlib.sha256(), np.memmap(path, np.uint16, mode='r', shape=(n,))
        for i in range(0, n, 1 << 24):
            h.update(tokens[i:i + (1 << 24)].tobytes())
        SCANNED[key] = h.hexdigest()
    return SCANNED[key]

def data_fingerprint(tokens, path, env):
    """{path, n_tokens, sha256 of those tokens}: caches and runs record it."""
    return dict(path=os.path.abspath(path), n_tokens=len(tokens), sha256=tokens_sha256(path, len(tokens)))

# ---- checkpoints, metrics and teachers -------------------------------------------------

def save_checkpoint(path, model, optimizer, scaler, it, best_val_loss, config, evals):
    """All an exact resume needs (and the evals), with its crc32; made in
    memory first, so that a full disk is an OSError, not a RuntimeError."""
    state = dict(model=model.state_dict(), model_config=asdict(model.config),
                 optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                 rng=torch.get_rng_state(), iter_num=it, best_val_loss=best_val_loss,
                 config=config, evals=evals)
    buffer = io.BytesIO()
    torch.save(dict(state, crc32=digest(state)), buffer)
    write_bytes(buffer.getbuffer(), path)

def load_checkpoint(path):
    """A checkpoint, crc32 checked; weights_only: it cannot run code."""
    need_file(path, "train it first (--mode teacher or train), or fix the path")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        crc = ckpt.pop('crc32')
        assert {'model', 'model_config', 'config', 'iter_num'} <= set(ckpt)
    except Exception as e:
        die(f"{path} is not a valid rskd checkpoint ({type(e).__name__}): it is "
            f"damaged or not ours")
    if crc != digest(ckpt):
        die(f"{path} does not match its checksum: it is damaged; use a copy, or "
            f"train it again")
    return dict(ckpt, path=path, loaded_mtime=os.stat(path).st_mtime_ns)

def restore(ckpt, model, optimizer, scaler, inputs, cfg):
    """(iteration, best val loss) of a checkpoint, if the inputs match."""
    if not ckpt:
        return 0, math.inf
    path = ckpt['path']
    for kind, now in inputs.items():
        was = ckpt['config'].get('inputs', {}).get(kind)
        if was and now and was['sha256'] != now['sha256']:
            die(f"{path} was trained with other {kind} ({was.get('path') or was['name']}) "
                f"than this run's {now.get('path') or now['name']}: resume it with its own")
    try:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
    except (RuntimeError, ValueError, KeyError):
        die(f"{path} holds a model of another shape or vocabulary")
    if ckpt['scaler']:  # empty when the saved run had none (bf16, fp32)
        scaler.load_state_dict(ckpt['scaler'])
    torch.set_rng_state(ckpt['rng'])
    if ckpt['iter_num'] >= cfg.max_iters:
        print(f"note: {path} is at iter {ckpt['iter_num']}, --max_iters is "
              f"{cfg.max_iters}: nothing to train; raise --max_iters to go on")
    return ckpt['iter_num'], ckpt['best_val_loss']

def start_metrics(metrics_path, ckpt, write):
    """The evals so far; if write, metrics.jsonl rewritten to hold exactly those."""
    evals = ckpt['evals'] if ckpt else []
    if write:
        write_bytes(''.join(dumps(e) + '\n' for e in evals).encode(), metrics_path)
    return list(evals)

def log_eval(metrics_path, record):
    """Append an eval's line to metrics.jsonl (after its checkpoint)."""
    with open(metrics_path, 'a') as f:
        f.write(dumps(record) + '\n')
        f.flush()
        os.fsync(f.fileno())
    print(f"eval {record['iter']}: " + ', '.join(f"{k} {record[k]:.4f}" for k in (
        'val_loss', 'val_ppl', 'ece', 'kl_teacher', 'spec_accept') if k in record))

def log_step(it, loss, lr, dt, step_time, tokens_per_step, model, cfg, env):
    """The training line: loss, lr, time, tok/s, MFU (known GPUs), ETA."""
    tok_s = tokens_per_step / dt
    mfu = model.estimate_mfu(tok_s / env.world, env.name, env.dtype)
    mfu = f", mfu {mfu:.1%}" if mfu else ''
    print(f"iter {it}/{cfg.max_iters}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms, "
          f"{tok_s:,.0f} tok/s{mfu}, ETA {(cfg.max_iters - it) * step_time:.0f}s", flush=True)

def check_finite(it, ckpt_path, loss, grad_norm=0.0, scaled=False):
    """Never save a non-finite val loss, never update from a non-finite
    loss or gradient (fp16's scaler skips such steps itself)."""
    if not (math.isfinite(loss) and (scaled or math.isfinite(grad_norm))):
        last = f"{ckpt_path} holds the last good state" if os.path.exists(ckpt_path) else ""
        die(f"the loss became {loss} (gradient norm {grad_norm}) at iter {it}; stopped "
            f"before saving or updating; {last or 'nothing was saved'}. Lower "
            f"--learning_rate or check the data and cache")

def weights_sha256(model):
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

def gpt_source(name):
    """(shape, checkpoint or None) of a GPT to load: a Hugging Face GPT-2 (a name or a folder)
    or a checkpoint of ours, its shape read before any weights."""
    if os.path.isdir(name) and not os.path.exists(os.path.join(name, 'config.json')):
        die(f"{name} is a folder without config.json: pass a checkpoint "
            f"({os.path.join(name, 'ckpt.pt')}?) or a Hugging Face GPT-2 folder")
    if name not in HF_TEACHERS and not os.path.isdir(name):
        ckpt = load_checkpoint(name)
        return ckpt['model_config'], ckpt
    try:
        import transformers  # only Hugging Face models need it
        c = transformers.AutoConfig.from_pretrained(name)
    except ImportError:
        die(f"{name} is a Hugging Face model: pip install transformers")
    except (OSError, ValueError) as e:
        die(f"could not load Hugging Face model {name}: {first_line(e)}")
    names = dict(vocab_size='vocab_size', block_size='n_positions', n_layer='n_layer',
                 n_head='n_head', n_embd='n_embd', model_type='model_type')
    return {k: getattr(c, hf, None) for k, hf in names.items()}, None

def load_gpt(name, vocab_size, block_size):
    """(model, {name, sha256 of its weights}), its vocabulary and length checked first."""
    shape, ckpt = gpt_source(name)
    name = name if name in HF_TEACHERS else os.path.abspath(name)
    if shape['vocab_size'] != vocab_size:  # (first: a non-GPT-2 model fails here)
        die(f"{name} has a vocabulary of {shape['vocab_size']} tokens, the data has "
            f"{vocab_size}: it must use the data's tokenizer")
    if shape.get('model_type', 'gpt2') != 'gpt2':
        die(f"{name} is a {shape['model_type']} model: only GPT-2s load into model.py")
    if (shape['block_size'] or 0) < block_size:
        die(f"{name} has block_size {shape['block_size']}, shorter than --block_size {block_size}")
    try:
        model = GPT.from_pretrained(name) if ckpt is None else GPT.from_checkpoint(ckpt)
    except Exception as e:  # no network, no weights, damaged ones, not a GPT
        die(f"could not load the weights of {name}: {first_line(e)}")
    if not all(bool(p.isfinite().all()) for p in model.parameters()):
        die(f"{name} has weights that are not finite: it is damaged")
    return model, dict(name=name, sha256=weights_sha256(model))

def load_teacher(name, vocab_size, block_size, env):
    """(frozen teacher, {name, sha256}): float32 logits under autocast."""
    model, info = load_gpt(name, vocab_size, block_size)
    return model.to(env.device).to_teacher(env.dtype), info

def student_model(cfg, V, ckpt):
    """The student: a resumed run's shape, --init_from's weights, or new."""
    if cfg.init_from != 'scratch' and not ckpt:
        return load_gpt(cfg.init_from, V, cfg.block_size)[0]
    shape = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    return GPT(GPTConfig(**ckpt['model_config']) if ckpt else GPTConfig(cfg.block_size, V, **shape))

def find_teacher(cfg, required, cache_meta, vocab_size, env):
    """(teacher, about): the cache's own, or --teacher, or (None, None)."""
    names = [cfg.teacher] if cfg.mode == 'train' else []
    if cache_meta:
        names = [cache_meta['teacher']['name'], cfg.teacher]
    hf_ok = importlib.util.find_spec('transformers') is not None
    found = [n for n in names if (n in HF_TEACHERS and hf_ok) or os.path.exists(n)]
    if not found and not required:
        if names and env.master:
            print(f"note: teacher {names[-1]} not found, so no kl_teacher/spec_accept metrics")
        return None, None
    teacher, info = load_teacher((found or names)[0], vocab_size, cfg.block_size, env)
    if cache_meta and info['sha256'] != cache_meta['teacher']['sha256']:
        die(f"teacher {info['name']} is not the one {cfg.cache_dir} was made from: pass "
            f"that one with --teacher")
    return teacher, info

# ---- the cache on disk ------------------------------------------------------------------
# meta.json and the files a FORMATS entry describes: nothing here knows a method or a file of
# one. The layout's own: seq_offsets (ragged: where sequences start), checksums (crc32 each).

CACHE_META = dict(format=str, version=int, method=str, vocab_size=int, block_size=int,
                  num_seqs=int, seed=int, split=str, teacher=dict(name=str, sha256=str),
                  data=dict(path=str, n_tokens=int, sha256=str), ids_dtype=str, dtype=str,
                  device=str, device_name=str, batch_size=int, torch=str, compress=bool,
                  complete=bool, seqs_done=int, entries=int, block_bytes=int)
# recorded, not compared on resume: on CUDA the draws depend on the GPU,
# batch size and torch, so such a resume is exact but not bit-identical
RECORDED = ('device_name', 'batch_size', 'torch')
PROGRESS = ('complete', 'seqs_done', 'entries', 'block_bytes')
FORMAT_KEYS = ('target', 'loss', 'unbiased', 'options', 'files', 'ragged', 'decode')

# The value checks FORMATS entries list: (a batch's values of a file, where
# each position's values start, meta.json) -> every value is valid.

def in_vocab(a, starts, meta):  # token ids: 0 <= id < vocab_size
    return a.size == 0 or bool(a.min() >= 0 and a.max() < meta['vocab_size'])

def at_least_1(a, starts, meta):
    return bool((a >= 1).all())

def positive(a, starts, meta):  # finite and > 0
    return bool(np.isfinite(a).all() and (a > 0).all())

def probability(a, starts, meta):  # finite, in [0, 1]
    return bool(np.isfinite(a).all() and (a >= 0).all() and (a <= 1).all())

def ordered(a, starts, bad):  # no bad(next - this) within a position
    within = np.ones(len(a), bool)
    within[starts] = False  # a position's first value follows another's
    return not bad(np.diff(a.astype(np.float64)))[within[1:]].any()

def ascending(a, starts, meta):  # strictly, within each position
    return ordered(a, starts, lambda step: step <= 0)

def descending(a, starts, meta):  # never ascending within a position
    return ordered(a, starts, lambda step: step > 0)

def sums_to(option):
    """each position's values sum to the cache's option (rounds...)"""
    def check(a, starts, meta):
        return a.size == 0 or bool(
            (np.add.reduceat(a.astype(np.int64), starts) == meta[option]).all())
    check.__name__ = f'sums_to_{option}'
    return check

def check_format(method, formats, config_cls=None, objectives=None):
    """Whatever a fork's FORMATS entry leaves out stops here, named."""
    fmt, fields_ = formats[method], getattr(config_cls, '__dataclass_fields__', {})

    def require(ok, what):
        if not ok:
            raise RuntimeError(f"FORMATS['{method}']{what}")
    missing = [k for k in FORMAT_KEYS if k not in fmt]
    require(not missing, f" has no {', '.join(missing)}: every entry needs {', '.join(FORMAT_KEYS)}")
    require(objectives is None or fmt['loss'] in objectives,
            f" trains with loss {fmt['loss']!r}, which has no OBJECTIVES entry")
    for name, kind in fmt['options'].items():
        require(name not in CACHE_META, f": every cache records {name} already: drop it")
        require(not config_cls or getattr(fields_.get(name), 'type', None) is kind,
                f": its option {name} ({kind.__name__}) needs a Config field of that type")
    for name, spec in fmt['files'].items():
        require(isinstance(spec, tuple) and len(spec) == 3,
                f": file '{name}' must be (dtype, per, checks)")
        dtype, per, checks = spec
        require(isinstance(checks, (list, tuple)) and checks and all(map(callable, checks)),
                f": file '{name}' has no value checks: list what its values must satisfy "
                f"(in_vocab, positive, ... in guardrails.py, or your own)")
        try:
            np.dtype(dtype if dtype != 'ids' else 'int32')
        except TypeError:
            require(False, f": file '{name}' has dtype {dtype!r}, which numpy does not know")
        require(per in ('position', 'entry') or fmt['options'].get(per) is int,
                f": file '{name}' has per={per!r}: use 'position', 'entry' or an int option")
        require(name not in ('seq_offsets', 'checksums', 'meta', 'blocks', 'vocab_order'),
                f": '{name}' is a file of every cache: give yours another name")
    ragged = fmt['ragged']
    require(ragged is None or fmt['files'].get(ragged, (0, 0))[1:2] == ('position',),
            f": ragged={ragged!r} must name its file of one count per position")
    require(ragged is not None or 'entry' not in [per for _, per, _ in fmt['files'].values()],
            " has files per 'entry': name the file that counts them in ragged=")
    return fmt

class RecordedOptions(SimpleNamespace):
    def __getattr__(self, name):  # (called only for a name not there)
        raise AttributeError(f"a target read the option {name}, which its FORMATS entry's options "
                             f"do not list: add {name} there, so that the cache records it")

def recorded_options(cfg, fmt):
    """The options a target may read: those its meta.json records."""
    common = ('seed', 'block_size', 'split')  # (every cache records these)
    return RecordedOptions(**{name: getattr(cfg, name) for name in (*common, *fmt['options'])})

def format_files(meta, formats):
    """name -> (dtype, per) of the files a cache's FORMATS entry names."""
    fmt = check_format(meta['method'], formats)
    return {name: (meta['ids_dtype'] if dtype == 'ids' else dtype, per)
            for name, (dtype, per, _) in fmt['files'].items()}

def cache_files(meta, formats):
    """name -> (dtype, per) of a cache's files on disk, in checksum order."""
    files = format_files(meta, formats)
    if meta['compress']:  # the format's files live inside the blocks
        files = dict(vocab_order=(meta['ids_dtype'], 'vocab'), blocks=('uint8', 'byte'))
    if meta['compress'] or formats[meta['method']]['ragged']:
        files['seq_offsets'] = ('uint64', 'sequence')
    files['checksums'] = ('uint32', 'crc')
    return files

def width(meta, per):
    """Values per position of a fixed-width file: 1, or its option (k)."""
    return 1 if per == 'position' else meta[per]

def file_sizes(meta, formats):
    """Each file's dtype and element count at meta['seqs_done']."""
    P, S = meta['seqs_done'] * meta['block_size'], meta['seqs_done']
    count = dict(entry=meta['entries'], byte=meta['block_bytes'], vocab=meta['vocab_size'],
                 sequence=S + 1, crc=S)
    return {name: (dtype, count[per] if per in count else P * width(meta, per))
            for name, (dtype, per) in cache_files(meta, formats).items()}

def spans(offsets, first, meta, per, seqs):
    """Each sequence's (lo, hi) elements in a file (None: damaged)."""
    T = meta['block_size']
    if per in ('entry', 'byte'):  # between seq_offsets[s] and [s + 1]
        out = [(int(offsets[s - first]), int(offsets[s + 1 - first])) for s in seqs]
        most = T * 255 if per == 'entry' else math.inf
        if any(not 0 <= hi - lo <= most for lo, hi in out):
            return None  # damaged offsets: read nothing (the checksums say so)
        return out
    if per == 'sequence':  # the sequence's own start and end
        return [(s, s + 2) for s in seqs]
    n = T * width(meta, per)  # fixed width: the file's size bounds these
    return [(s * n, (s + 1) * n) for s in seqs]

def sequence_crcs(arrays, units, meta, seqs, base):
    """Each sequence's crc32; arrays[name]: the file from base[name] on."""
    offsets, first = arrays.get('seq_offsets'), base.get('seq_offsets', 0)
    crcs, shared = [], 0  # (a whole file that every sequence needs: vocab_order)
    for name in [name for name, (_, per) in units.items() if per == 'vocab']:
        shared = zlib.crc32(np.ascontiguousarray(arrays[name]), shared)
    for s in seqs:
        crc = shared
        for name, (_, per) in units.items():
            where = per not in ('crc', 'vocab') and spans(offsets, first, meta, per, [s])
            if where is None:
                crc = -1
                break
            for lo, hi in where or []:
                crc = zlib.crc32(np.ascontiguousarray(
                    arrays[name][lo - base[name]:hi - base[name]]), crc)
        crcs.append(crc)
    return crcs

def failed_check(meta, fmt, rows):
    """The value check that a batch's rows fail, or None."""
    for name, (_, per, checks) in fmt['files'].items():
        values = rows[name]
        if per == 'entry':  # ragged: fmt['ragged'] counts each position's
            counts = rows[fmt['ragged']].astype(np.int64)
            if counts.sum() != len(values):
                return f"the count of '{name}' ({fmt['ragged']})"
            starts = np.cumsum(counts) - counts
        else:
            starts = np.arange(0, len(values), width(meta, per))
        for check in checks:
            if not check(values, starts, meta):
                return f"{check.__name__} of '{name}'"
    return None

def to_ranges(seqs):  # sorted sequence numbers -> [(first, last), ...] of their runs
    runs = itertools.groupby(enumerate(seqs), lambda pair: pair[1] - pair[0])
    return [(run[0][1], run[-1][1]) for run in (list(r) for _, r in runs)]

# ---- compressed caches (--compress true, the default) ----
# Each sequence is one block that decodes alone: blocks.bin holds them back to back,
# seq_offsets.bin the byte where each starts, checksums.bin their crc32s (checked before a
# block is decompressed), vocab_order.bin the token ids, the data's most frequent first. In
# a block, ids are stored as their rank in vocab_order. Where the first ragged ids file
# ascends within each position (rs, is), a position's entries are stored in rank order
# instead, each rank as its step from the one before. Each file's values are then split into
# byte planes (low bytes first), each deflated (zlib, raw, Z_RLE). A block: a flag byte (1:
# rank order), one uint32 size per plane, the planes, file after file in FORMATS order.

def vocab_order(tokens, V, dtype):
    """The token ids by their count in the first 16M tokens, most first
    (a cache stores it: a tokenizer's own order would do, less well)."""
    counts = np.bincount(tokens[:1 << 24], minlength=V)[:V]
    return np.argsort(-counts, kind='stable').astype(dtype)

def ragged_layout(fmt, lengths):
    """(each entry's position, the format's first ids file of entries or None)."""
    key = next((n for n, (dt, per, _) in fmt['files'].items() if dt == 'ids' and per == 'entry'), None)
    return np.repeat(np.arange(len(lengths)), lengths.astype(np.int64)), key

def sort_within(pos, key):
    """The permutation that sorts each position's entries by key (>= 0)."""
    return np.argsort(pos * (int(key.max(initial=0)) + 1) + key)  # (keys unique)

def encode_blocks(arrays, meta, formats, order, n):
    """A batch's values (file -> n sequences' values, in turn) -> n blocks."""
    fmt, files, T = formats[meta['method']], format_files(meta, formats), meta['block_size']
    rank = np.argsort(order).astype(order.dtype)  # id -> rank
    a = {name: rank[v] if fmt['files'][name][0] == 'ids' else v for name, v in arrays.items()}
    entry, flags = [name for name, (_, per) in files.items() if per == 'entry'], np.zeros(n, np.uint8)
    pos, key = ragged_layout(fmt, arrays[fmt['ragged']]) if entry else (None, None)
    if key:  # sequences whose positions ascend go in rank order, ranks as steps
        ids, seq = arrays[key].astype(np.int64), pos // T
        flags[:] = 1
        flags[seq[1:][(np.diff(ids) <= 0) & (pos[1:] == pos[:-1])]] = 0
        ranked = flags[seq].astype(bool)
        r = a[key].astype(np.int64)
        perm = sort_within(pos, np.where(ranked, r, np.arange(len(r))))
        a.update({name: a[name][perm] for name in entry})
        r = a[key].astype(np.int64)
        step = np.diff(r, prepend=0)
        first = np.flatnonzero(np.diff(pos, prepend=-1))  # each position's first entry
        step[first] = r[first]
        a[key] = np.where(ranked, step, r).astype(a[key].dtype)
    bounds = np.searchsorted(pos // T, np.arange(n + 1)) if entry else None
    blocks = []
    for s in range(n):
        planes = []
        for name, (dt, per) in files.items():
            size = T * width(meta, per) if per != 'entry' else 0
            lo, hi = (s * size, s * size + size) if size else bounds[s:s + 2]
            le = np.dtype(dt).newbyteorder('<')  # (the planes are little-endian's bytes)
            for plane in a[name][lo:hi].astype(le).view(np.uint8).reshape(-1, le.itemsize).T:
                z = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
                planes.append(z.compress(plane.tobytes()) + z.flush())
        sizes = np.array([len(p) for p in planes], '<u4')
        blocks.append(bytes([flags[s]]) + sizes.tobytes() + b''.join(planes))
    return blocks

def decode_blocks(blocks, meta, formats, order):
    """Blocks (checked) -> the format's files' values, as encode_blocks got them."""
    fmt, files = formats[meta['method']], format_files(meta, formats)
    n_planes = sum(np.dtype(dt).itemsize for dt, _ in files.values())
    parts, flags = {name: [] for name in files}, []
    for b in blocks:
        sizes, at = np.frombuffer(b, '<u4', n_planes, 1), 1 + 4 * n_planes
        planes = []
        for size in sizes.tolist():
            planes.append(np.frombuffer(zlib.decompress(b[at:at + size], -15), np.uint8))
            at += size
        for name, (dt, _) in files.items():
            k, dt = np.dtype(dt).itemsize, np.dtype(dt).newbyteorder('<')
            parts[name].append(np.stack(planes[:k], 1).view(dt).reshape(-1))
            planes = planes[k:]
        flags.append(b[0])
    a = {name: np.concatenate(p).astype(files[name][0]) for name, p in parts.items()}
    entry = [name for name, (_, per) in files.items() if per == 'entry']
    pos, key = ragged_layout(fmt, a[fmt['ragged']]) if entry else (None, None)
    if key:  # undo the steps, then restore the ascending ids within each position
        ranked = np.repeat(np.array(flags, bool), [len(p) for p in parts[key]])
        step = a[key].astype(np.int64)
        total = np.cumsum(step)
        first = np.flatnonzero(np.diff(pos, prepend=-1))
        within = total - np.repeat(total[first] - step[first], np.diff(first, append=len(pos)))
        a[key] = order[np.where(ranked, within, step)]
        perm = sort_within(pos, np.where(ranked, a[key], np.arange(len(pos))))
        a.update({name: a[name][perm] for name in entry})
    for name in [n for n, (dt, _, _) in fmt['files'].items() if dt == 'ids' and n != key]:
        a[name] = order[a[name]]
    return a

def read_cache_meta(cache_dir, formats):
    """CACHE_DIR/meta.json, checked."""
    path = os.path.join(cache_dir, 'meta.json')
    if not os.path.exists(path):
        die(f"no cache in {cache_dir}: make one with --mode cache --cache_dir {cache_dir}")
    fix = "pass another --cache_dir, or make the cache again into an empty one"
    meta = read_json(path, fix)
    method = meta.get('method')
    if meta.get('version') == 3:  # version 4's layout when not compressed
        meta.update(version=4, compress=False, block_bytes=0)
    if meta.get('format') != 'rskd-cache' or meta.get('version') != 4:
        die(f"{cache_dir} holds no cache of this version of rskd: {fix}")
    if not isinstance(method, str) or method not in formats:
        die(f"{path} has method {method!r}, not {' or '.join(formats)}: {fix}")
    fmt = check_format(method, formats)
    check_fields(meta, {**CACHE_META, **fmt['options']}, path, fix, signed=fmt['options'])
    V = meta['vocab_size']
    bad = out_of_range(meta, [
        ('ids_dtype', meta['ids_dtype'] == ids_dtype(V), f"{ids_dtype(V)} for {V} tokens"),
        ('seqs_done', meta['seqs_done'] <= meta['num_seqs'], "at most num_seqs"),
        *((per, 1 <= meta[per] <= V, "1 to vocab_size") for per in row_options(fmt))])
    if bad:
        die(f"{path}: {bad[0]} {meta[bad[0]]!r} is out of range ({bad[1]}): it was "
            f"edited or damaged; {fix}")
    return meta

def ids_dtype(V):  # the cache's token ids
    return 'uint16' if V <= 65536 else 'int32'

def row_options(fmt):  # the options that set a file's values per position ('k')
    return {per for _, per, _ in fmt['files'].values()} - {'position', 'entry'}

def cache_memmaps(cache_dir, meta, formats, tail_ok=False):
    """The files, mapped, once their sizes match (tail_ok: or run past)."""
    mm = {}
    for name, (dt, n) in file_sizes(meta, formats).items():
        path = os.path.join(cache_dir, f'{name}.bin')
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        want = n * np.dtype(dt).itemsize
        if size != want and not (tail_ok and size > want):
            die(f"{path} does not have the size {cache_dir}/meta.json gives: the cache is "
                f"damaged; make it again with --mode cache into an empty --cache_dir")
        mm[name] = np.memmap(path, dtype=dt, mode='r', shape=(n,)) if n else np.zeros(0, dt)
    return mm

def read_rows(mm, meta, formats, seqs):
    """The values of sequences seqs, file by file (decoded, if compressed)."""
    rows = {}
    for name, (_, per) in cache_files(meta, formats).items():
        if per in ('sequence', 'crc', 'vocab'):  # (no values)
            continue
        where = spans(mm.get('seq_offsets'), 0, meta, per, seqs)
        if where is None or any(hi > len(mm[name]) for _, hi in where):
            where = [(0, 0)] * len(seqs)  # damaged offsets: the checksums say so
        rows[name] = [mm[name][lo:hi] for lo, hi in where]
    if meta['compress']:
        return decode_blocks(rows['blocks'], meta, formats, mm['vocab_order'])
    return {name: np.concatenate(parts) for name, parts in rows.items()}

def checked_rows(mm, meta, formats, seqs):
    """The rows of seqs if they decode and pass the format's checks, else None."""
    try:
        rows = read_rows(mm, meta, formats, seqs)
    except (zlib.error, ValueError, IndexError):  # (a block with a valid crc never fails)
        return None
    return None if failed_check(meta, formats[meta['method']], rows) else rows

def bad_sequences(mm, meta, formats, seqs):
    """(The sequences failing their checksum or the format's checks, the
    others' rows.) Blocks are decoded only once their checksum matches."""
    units = cache_files(meta, formats)
    crcs = sequence_crcs(mm, units, meta, seqs, {name: 0 for name in units})
    bad = {s for s, crc in zip(seqs, crcs) if crc != mm['checksums'][s]}
    whole = [s for s in seqs if s not in bad]
    rows = checked_rows(mm, meta, formats, whole) if whole else None
    if whole and rows is None:
        bad |= {s for s in whole if checked_rows(mm, meta, formats, [s]) is None}
    return sorted(bad), rows

def cache_reader(cfg, loss, V, data, formats, checked=True):
    """(meta, read): a cache made for this run; read(seqs) gives a batch's
    values, name -> tensor, checked before a step uses them."""
    meta, d, fix = read_cache_meta(cfg.cache_dir, formats), cfg.cache_dir, "pass another --cache_dir"
    if formats[meta['method']]['loss'] != loss:
        want = ' or '.join(m for m, f in formats.items() if f['loss'] == loss)
        die(f"{d} is a {meta['method']} cache, --loss {loss} needs a {want} cache: {fix}")
    if not meta['complete']:
        die(f"{d} is incomplete ({meta['seqs_done']}/{meta['num_seqs']} sequences): rerun "
            f"--mode cache to finish it")
    if meta['block_size'] != cfg.block_size:
        die(f"{d} was made with block_size {meta['block_size']}, this run uses "
            f"{cfg.block_size}: pass --block_size {meta['block_size']}")
    if meta['split'] != 'train' or meta['vocab_size'] != V:
        die(f"{d} holds {meta['split']} targets over {meta['vocab_size']} tokens, not train "
            f"over {V}: {fix}")
    n = meta['data']['n_tokens']  # a cache of more of the same data serves any prefix of it
    longer = data['n_tokens'] < n <= os.path.getsize(data['path']) // 2
    if meta['data']['sha256'] != tokens_sha256(data['path'], n if longer else data['n_tokens']):
        die(f"{d} was made from other training data ({meta['data']['n_tokens']:,} tokens of "
            f"{meta['data']['path']}, this run uses {data['n_tokens']:,}; check --data_dir "
            f"and --max_seqs): {fix}")
    if longer and os.environ.get('RANK', '0') == '0':
        print(f"note: using the first {(data['n_tokens'] - 1) // cfg.block_size:,} of the "
              f"{meta['num_seqs']:,} sequences of {d}")
    mm = cache_memmaps(d, meta, formats)
    fmt = formats[meta['method']]
    ids = [name for name, (dtype, _, _) in fmt['files'].items() if dtype == 'ids']
    about = hashlib.sha256(json.dumps({k: meta[k] for k in meta if k not in RECORDED}).encode())
    about.update(mm['checksums'].tobytes())  # (what a resume of the run compares)
    meta['identity'] = dict(name=os.path.abspath(d), sha256=about.hexdigest())

    def read(seqs):
        bad, rows = bad_sequences(mm, meta, formats, seqs) if checked else ([], None)
        if bad:
            die(f"{d} is damaged: sequence {bad[0]} ({len(bad)} in this batch) fails its "
                f"checksum or holds values rskd never writes; --mode verify lists every "
                f"damaged range. Make the cache again into an empty --cache_dir")
        rows = rows or read_rows(mm, meta, formats, seqs)
        return {name: torch.from_numpy(a.astype(np.int64) if name in ids else a)
                for name, a in rows.items()}
    return meta, read

def verify_cache(cfg, env, formats):
    """--mode verify: every sequence, and the data if found (exit 1: bad)."""
    d = cfg.cache_dir
    meta = read_cache_meta(d, formats)
    mm = cache_memmaps(d, meta, formats, tail_ok=not meta['complete'])
    units, S, T = cache_files(meta, formats), meta['seqs_done'], meta['block_size']
    if os.path.isfile(os.path.join(cfg.data_dir, 'meta.json')):
        path, size, _ = check_data(cfg.data_dir, meta['split'], T, 0, env)  # and its crc32
        n = meta['data']['n_tokens']  # all of the split, or max_seqs * T + 1 of it
        if n > size or tokens_sha256(path, n) != meta['data']['sha256']:
            die(f"{d} was made from other tokens than {path}'s: pass its --data_dir")
        print(f"verify: {path} matches its checksum and the cache's data fingerprint")
    bad, t0 = [], time.time()
    progress = progress_printer('verify', 'positions', 0, S * T)
    for lo in range(0, S, 1024):
        seqs = list(range(lo, min(lo + 1024, S)))
        bad += bad_sequences(mm, meta, formats, seqs)[0]
        progress(seqs[-1] * T + T)
    for a, b in to_ranges(bad):
        print(f"damaged: sequences {a}-{b} (positions {a * T:,}-{(b + 1) * T - 1:,})")
    if bad:
        die(f"{d}: {len(bad):,} of {S:,} sequences are damaged, in the {len(to_ranges(bad))} "
            f"ranges above: make the cache again with --mode cache (into an empty --cache_dir)")
    size, dt = sum(os.path.getsize(f'{d}/{n}.bin') for n in units), time.time() - t0
    print(f"verify: {d} is intact: {S:,} sequences{'' if meta['complete'] else ' so far (incomplete)'}, "
          f"{size / 1e6:,.1f} MB in {dt:.1f}s ({size / 1e6 / max(dt, 1e-9):,.0f} MB/s)")

def write_cache(cfg, env, formats, S, V, teacher, data):
    """A CacheWriter (None: complete); a different cache is refused."""
    fmt = check_format(cfg.method, formats)
    check_model_size(cfg, V, env)  # (the teacher is loaded)
    for per in row_options(fmt):
        if not 1 <= getattr(cfg, per) <= V:  # (--k: no more ids than tokens)
            die(f"--{per} must be 1 to the vocabulary size {V}, got {getattr(cfg, per)}")
    meta = dict(format='rskd-cache', version=4, method=cfg.method, vocab_size=V,
                block_size=cfg.block_size, num_seqs=S, seed=cfg.seed, split=cfg.split,
                teacher=teacher, data=data, ids_dtype=ids_dtype(V),
                dtype=env.dtype, device=env.device_type, device_name=env.name,
                batch_size=cfg.batch_size, torch=torch.__version__, compress=cfg.compress,
                complete=False, seqs_done=0, entries=0, block_bytes=0,
                **{k: getattr(cfg, k) for k in fmt['options']})
    if os.path.exists(os.path.join(cfg.cache_dir, 'meta.json')):  # (every rank checks)
        old = read_cache_meta(cfg.cache_dir, formats)
        for key, now in meta.items():
            was = old.get(key)
            if key in ('teacher', 'data'):
                was, now = was.get('sha256'), now['sha256']
            if key not in PROGRESS + RECORDED and was != now:
                die(f"{cfg.cache_dir} holds a cache made with a different {key} ({was} vs "
                    f"now {now}): use another --cache_dir, or move it away to start over")
        meta = old
        if meta['complete']:
            cache_memmaps(cfg.cache_dir, meta, formats)  # its files are whole
            if env.master:
                print(f"{cfg.cache_dir} is complete ({S} sequences): nothing to do")
            return None
    return CacheWriter(cfg, env, meta, formats)

COMMIT = 'rskd-commit'  # the cache's writing thread (folder_lock waits for it)

def until_ended(commit, quiet=False):
    """Wait for a commit thread to end, through signals: the first one is
    raised once it has (quiet: not at all, an error is on its way out
    already). A commit takes moments; SIGKILL is safe anyway. Python < 3.13
    takes a join that a signal interrupts for the thread's end, so the
    thread has an event of its own."""
    caught = None
    while not commit.ended.is_set():
        try:
            commit.ended.wait()
        except (Interrupted, KeyboardInterrupt) as e:
            caught = caught or e
    if caught and not quiet:
        raise caught

def gather_bytes(part, env):
    """Every rank's byte array on rank 0, in rank order ([] elsewhere):
    tensors padded to the longest, not pickles; nccl's on the GPU."""
    mine = torch.from_numpy(np.concatenate([np.array([len(part)], np.uint64).view(np.uint8), part]))
    longest = torch.tensor([len(mine)], device=env.device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    mine = torch.cat([mine, mine.new_zeros(int(longest) - len(mine))]).to(env.device)
    parts = [torch.empty_like(mine) for _ in range(env.world)] if env.master else None
    dist.gather(mine, parts, dst=0)
    parts = [p.cpu().numpy() for p in parts or []]
    return [p[8:8 + int(p[:8].view(np.uint64)[0])] for p in parts]

class CacheWriter:
    """Rank 0 appends and commits each batch (meta.json never runs ahead
    of the data), to new files or ones cut back to the last commit."""

    def __init__(self, cfg, env, meta, formats):
        self.cfg, self.env, self.meta, self.fmt = cfg, env, meta, formats[meta['method']]
        self.formats, self.files = formats, format_files(meta, formats)
        self.units, self.handles, self.pending = cache_files(meta, formats), {}, []
        T, d, self.start = meta['block_size'], cfg.cache_dir, meta['seqs_done']
        os.makedirs(d, exist_ok=True)
        for name, (dt, n) in file_sizes(meta, formats).items() if env.master else []:
            path, size = os.path.join(d, f'{name}.bin'), n * np.dtype(dt).itemsize
            if not self.start:  # a new cache: empty files (seq_offsets: its 0)
                tokens = np.memmap(meta['data']['path'], np.uint16, 'r')  # (all of the split)
                start = (vocab_order(tokens, meta['vocab_size'], dt) if self.units[name][1] == 'vocab'
                         else np.zeros(n, dt))
                with open(path, 'wb') as f:
                    f.write(start.tobytes())
            elif os.path.isfile(path) and os.path.getsize(path) >= size:
                os.truncate(path, size)
            else:
                die(f"{path} is shorter than its meta.json says: the cache is damaged; "
                    f"make it again in an empty --cache_dir")
            if self.units[name][1] == 'vocab':  # written once, read back
                self.order = np.fromfile(path, dt)
                if not np.array_equal(np.sort(self.order), np.arange(meta['vocab_size'])):
                    die(f"{path} is damaged: make the cache again in an empty --cache_dir")
                continue
            # unbuffered: a failed commit leaves no bytes in Python's buffers
            self.handles[name] = open(path, 'ab', buffering=0)
        if env.master and self.start:
            print(f"resuming {d} at sequence {self.start}/{meta['num_seqs']}")
        elif env.master:
            write_json(meta, os.path.join(d, 'meta.json'))
        if env.ddp and meta['compress']:  # every rank encodes its own parts
            order = torch.from_numpy(getattr(self, 'order', np.zeros(meta['vocab_size'])).astype(np.int64))
            order = order.to(env.device)  # (nccl moves only device tensors)
            dist.broadcast(order, src=0)
            self.order = order.cpu().numpy().astype(ids_dtype(meta['vocab_size']))
        if env.ddp:
            dist.barrier()
        self.t0 = self.committed = time.time()
        self.progress = progress_printer('cache', 'positions', self.start * T, meta['num_seqs'] * T)

    def add(self, part, seqs, done):
        """part: the target's output for seqs (None: none); done: the
        sequences finished once every rank's part is in."""
        part = np.zeros(0, np.uint8) if part is None else self.stored(self.checked(part, len(seqs)), len(seqs))
        # rank 0 gets every rank's part, in sequence order
        self.pending += gather_bytes(part, self.env) if self.env.ddp else [part]
        last = done == self.meta['num_seqs']
        if self.env.master and (last or time.time() - self.committed >= self.cfg.commit_seconds):
            # the commit (writes, fsync, meta.json) runs beside the next
            # batch; one at a time, in order, and its error is raised here
            self.wait()
            self.writing = threading.Thread(target=self.commit, args=(self.pending, done), name=COMMIT)
            self.writing.ended = threading.Event()
            self.writing.start()
            self.pending, self.committed = [], time.time()

    def wait(self):
        """The commit in flight is done; its error, if any, raised here."""
        if getattr(self, 'writing', None):
            until_ended(self.writing)
            self.writing = None
        if getattr(self, 'failed', None):
            raise self.failed

    def checked(self, part, n):
        """The target's tensors as arrays, once they match its entry."""
        where, files = f"FORMATS['{self.meta['method']}']: its target", self.fmt['files']
        if set(part) != set(files) or not all(isinstance(t, torch.Tensor) for t in part.values()):
            raise RuntimeError(f"{where} must return exactly its files {sorted(files)} as "
                               f"tensors, not {sorted(part)}")
        # copied to the host without waiting one by one (pinned), then one wait for all
        host = {name: t.detach().to('cpu', non_blocking=True) for name, t in part.items()}
        if self.env.device_type == 'cuda':
            torch.cuda.current_stream(self.env.device).synchronize()
        raw = {name: t.numpy().reshape(-1) for name, t in host.items()}
        arrays = {name: a.astype(self.files[name][0]) for name, a in raw.items()}
        for name, (_, per, _) in files.items():
            want = (int(arrays[self.fmt['ragged']].sum()) if per == 'entry' else
                    n * self.meta['block_size'] * width(self.meta, per))
            if len(arrays[name]) != want:
                raise RuntimeError(f"{where} gave {len(arrays[name])} values of '{name}' "
                                   f"for {n} sequences, not {want}")
            if arrays[name].dtype.kind in 'ui' and not np.array_equal(arrays[name], raw[name]):
                raise RuntimeError(f"{where} gave values of '{name}' that its dtype "
                                   f"{arrays[name].dtype} cannot hold")
        failed = failed_check(self.meta, self.fmt, arrays)
        if failed:
            raise RuntimeError(f"{where} gave values that {failed} refuses")
        return arrays

    def stored(self, arrays, n):
        """What a part appends (compressed: its blocks, made on its own
        rank), as one byte array: a header (n, entries, len(sizes), each
        value array's bytes), each sequence's size in seq_offsets' unit,
        then the value arrays in file order (compressed: the blocks)."""
        files, meta = self.files, self.meta  # entries: the values of the first ragged file (or first file)
        entries = len(arrays[next((k for k, (_, per) in files.items() if per == 'entry'), next(iter(files)))])
        ragged, sizes = self.fmt['ragged'], []
        if meta['compress']:
            blocks = encode_blocks(arrays, meta, self.formats, self.order, n)
            arrays, sizes = dict(blocks=np.frombuffer(b''.join(blocks), np.uint8)), [len(b) for b in blocks]
        elif ragged:
            sizes = arrays[ragged].reshape(n, -1).sum(1, dtype=np.uint64)
        values = [np.ascontiguousarray(arrays[name]).view(np.uint8) for name in self.names()]
        head = np.array([n, entries, len(sizes), *[len(v) for v in values]], np.uint64)
        return np.concatenate([head.view(np.uint8), np.asarray(sizes, np.uint64).view(np.uint8), *values])

    def names(self):  # the value arrays of a part, in order
        return ['blocks'] if self.meta['compress'] else list(self.files)

    def unpacked(self, part):
        """stored()'s byte array -> (values by file name, n, entries, sizes or None)."""
        n, entries, k = (int(v) for v in part[:24].view(np.uint64))
        names = self.names()
        lengths = part[24:24 + 8 * len(names)].view(np.uint64).astype(np.int64)
        at = 24 + 8 * len(names)
        sizes, at, values = part[at:at + 8 * k].view(np.uint64), at + 8 * k, {}
        for name, length in zip(names, lengths):
            values[name] = part[at:at + length].view(np.uint8 if name == 'blocks' else self.files[name][0])
            at += length
        return values, n, entries, sizes if k else None

    def commit(self, pending, seqs_done):
        """Append the parts and their crc32s, fsync, then meta.json (an
        error is kept for wait() to raise: no thread traceback)."""
        try:
            self.append(pending, seqs_done)
        except BaseException as e:
            self.failed = e
        finally:
            threading.current_thread().ended.set()

    def append(self, pending, seqs_done):
        meta, units, T = self.meta, self.units, self.meta['block_size']
        for part in filter(len, pending):
            values, n, part_entries, sizes = self.unpacked(part)
            first = meta['seqs_done']
            done = dict(entry=meta['entries'], byte=meta['block_bytes'], vocab=0, sequence=first)
            base = {name: done[per] if per in done else first * T * width(meta, per)
                    for name, (_, per) in units.items() if per != 'crc'}
            part = dict(values, vocab_order=getattr(self, 'order', None))
            if sizes is not None:  # each sequence's start, then where each one ends
                start = meta['block_bytes'] if meta['compress'] else meta['entries']
                ends = np.cumsum(sizes, dtype=np.uint64)
                part['seq_offsets'] = start + np.concatenate([np.zeros(1, np.uint64), ends])
            crcs = sequence_crcs(part, units, meta, range(first, first + n), base)
            part = dict(part, checksums=np.array(crcs, dtype=np.uint32))
            if sizes is not None:  # (the file holds the leading 0 already)
                part['seq_offsets'] = part['seq_offsets'][1:]
            for name, f in self.handles.items():  # (a failed write: a rerun cuts it off)
                data = memoryview(part[name].astype(units[name][0]).tobytes())
                while data:  # an unbuffered write may take only part
                    data = data[f.write(data):]
            meta['entries'] += part_entries
            meta['block_bytes'] += len(part['blocks']) if meta['compress'] else 0
            meta['seqs_done'] = first + n
        for f in self.handles.values():
            os.fsync(f.fileno())
        meta.update(seqs_done=seqs_done, complete=seqs_done == meta['num_seqs'])
        write_json(meta, os.path.join(self.cfg.cache_dir, 'meta.json'))
        self.progress(seqs_done * T)

    def finish(self):
        """Close the files, print the size; the throughput (tok/s)."""
        meta, d = self.meta, self.cfg.cache_dir
        self.wait()
        if self.env.device_type == 'cuda':
            torch.cuda.synchronize()
        tok_s = (meta['num_seqs'] - self.start) * meta['block_size'] / (time.time() - self.t0)
        if self.env.master and not meta['complete']:  # (every sequence in,
            self.append([], meta['seqs_done'])  # but a meta edited or older)
        for f in self.handles.values():
            f.close()
        if self.env.master:
            P = meta['num_seqs'] * meta['block_size']
            size = sum(os.path.getsize(os.path.join(d, f'{n}.bin')) for n in self.units)
            unique = f"{meta['entries'] / P:.2f} unique tokens/position, " if self.fmt['ragged'] else ""
            print(f"cache complete: {d}, {P:,} positions, {unique}{size / P:.2f} bytes/position, "
                  f"{size / 1e6:.1f} MB, {tok_s:,.0f} tok/s")
        return tok_s

# ---- progress, folders, signals and errors ---------------------------------------------

def progress_printer(what, unit, start, total, every=5.0):
    """progress(done): 'done/total, tok/s, ETA' every few seconds."""
    t0, last = time.time(), [0.0]

    def progress(done):
        now = time.time()
        if now - last[0] > every or done == total:
            last[0] = now
            tok_s = (done - start) / (now - t0)
            print(f"{what} {done:,}/{total:,} {unit}  {tok_s:,.0f} tok/s  "
                  f"ETA {(total - done) / max(tok_s, 1e-9):.0f}s", flush=True)
    return progress

def output_folder(cfg, env):
    """The folder this rank writes (None: none; verify may read only)."""
    folder = cfg.cache_dir if cfg.mode in ('cache', 'verify') else cfg.out_dir
    if env.master and (cfg.mode != 'verify' or os.access(folder, os.W_OK)):
        return folder

@contextmanager
def folder_lock(folder, ckpt=None):
    """One writer per folder: an flock, which the OS drops when its holder
    dies. A folder that this run made and left empty goes."""
    if folder is None:
        yield
        return
    new = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    lock = os.path.join(folder, '.lock')
    with open(lock, 'a+') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            die(f"{folder} is in use by another rskd run (process {f.read().strip() or '?'}): "
                f"wait for it to finish, or use another folder")
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        if ckpt and os.stat(ckpt['path']).st_mtime_ns != ckpt['loaded_mtime']:
            die(f"{ckpt['path']} was saved by another run as this one started: run again")
        try:
            yield
        finally:  # (held until the cache's last commit has ended)
            try:
                for t in threading.enumerate():
                    if t.name == COMMIT:  # (an error on its way out keeps its exit)
                        until_ended(t, quiet=sys.exc_info()[0] is not None)
            finally:
                f.truncate(0)
                if new and os.listdir(folder) == ['.lock']:
                    os.remove(lock)
                    os.rmdir(folder)

@contextmanager
def stop_requested():
    """Catches SIGINT and SIGTERM while training: yields a Stop, which
    records them; a second signal stops at once."""
    stop = Stop()
    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}

    def request_stop(sig, frame):
        stop.append(sig)
        signal.signal(sig, handlers[sig])
    for sig in handlers:
        signal.signal(sig, request_stop)
    try:
        yield stop
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

SIGNALS = (signal.SIGINT, signal.SIGTERM)

class Stop(list):
    """The signals this rank caught: .flags(env) for the all_reduce, then
    .seen(flags) and .exit(said) once the flags are reduced."""
    def flags(self, env):
        """1 for each of SIGNALS caught, as a tensor on the rank's device
        that can ride on the loss's all_reduce (filled: no host copy)."""
        flags = torch.zeros(len(SIGNALS), device=env.device)
        for i in [i for i, sig in enumerate(SIGNALS) if sig in self]:
            flags[i] = 1
        return flags

    def seen(self, flags):
        """Whether any rank caught a signal, from the reduced flags."""
        self.first = next((sig for sig, f in zip(SIGNALS, flags) if f), 0)
        return bool(self.first)

    def exit(self, said):
        """Ends the run: one line, exit status 128 + the signal."""
        raise Interrupted(self.first, said)

class Interrupted(Exception):
    """A signal stopped the run: args (signal number[, what it saved])."""

INTERRUPTS = []  # signals received: what fails after one is part of the stop

def interrupt(sig, frame):
    INTERRUPTS.append(sig)
    raise Interrupted(sig)

def still_running():
    """Raise Interrupted again if a signal came: code that catches every
    exception calls this before it reports or recovers."""
    if INTERRUPTS:
        raise Interrupted(INTERRUPTS[0])

@contextmanager
def entry_point():
    """Every entry point's error boundary: a mistake, a failing disk or a
    signal ends in one line, exit 1 (128 + a signal), no traceback."""
    INTERRUPTS.clear()
    handlers = {s: signal.signal(s, interrupt) for s in SIGNALS}
    try:
        yield
    except (Exception, KeyboardInterrupt) as e:
        if isinstance(e, (KeyboardInterrupt, Interrupted)) or INTERRUPTS:
            sig = e.args[0] if isinstance(e, Interrupted) else (INTERRUPTS or [2])[0]
            said = e.args[1:] if isinstance(e, Interrupted) else ()
            if os.environ.get('RANK', '0') == '0':
                print(f"interrupted ({signal.Signals(sig).name}): " + (*said, "work is kept up "
                      "to the last save: rerun the same command to go on")[0], file=sys.stderr)
            sys.exit(128 + sig)
        if isinstance(e, (FloatingPointError, ModuleNotFoundError)):  # (bad numbers; no module)
            die(f"{e.name} is missing: pip install {e.name}" if isinstance(e, ImportError) else str(e))
        if isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or 'allocate memory' in str(e):
            die(f"out of memory ({first_line(e)[:80]}): use a smaller --batch_size or model")
        if os.environ.get('WORLD_SIZE', '1') != '1' and in_collective(e):  # (another rank's failure)
            die(f"rank {os.environ.get('RANK')}: a collective between the ranks failed "
                f"({first_line(e)[:100]}): if another rank stopped first, its line says why")
        if not isinstance(e, OSError):
            raise
        path = e.filename2 or e.filename  # (a rename's destination is filename2)
        die(f"{e.strerror or e}{': ' + str(path) if path else ''}: fix that and rerun the "
            f"same command; work saved before is intact")
    finally:  # (a signal on the way out is not "while starting": ignored)
        for s, h in handlers.items():
            signal.signal(s, signal.SIG_IGN if h is interrupted_while_starting else h)

@contextmanager
def ddp_teardown(env):
    """End DDP once every rank is done (at shutdown, gloo can abort)."""
    try:
        yield
        if env.ddp:
            dist.barrier()
    finally:
        if env.ddp:
            gc.collect()
            dist.destroy_process_group()
