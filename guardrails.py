"""
The guard rails of rskd.py: everything that keeps a run from losing work, training on the wrong files or
ending in a traceback, and that a reader of the method need not see.

- the command line, generated from rskd.Config's fields, and the checks of its values
- the run's environment: torchrun's ranks, the device, the dtype, autocast
- the resume-config merge (a resumed run keeps what would change its data order or model)
- data and cache validation: meta.json schemas, file sizes, fingerprints of the data and the teacher,
  the data's crc32, and each cache sequence's crc32 and values (checked per batch, and by --mode verify)
- atomic writes, checkpoint and teacher loading (weights only: a file cannot run code), metrics.jsonl
  kept consistent with the checkpoint
- the cache's files on disk, as each rskd.FORMATS entry describes them: the writer (creation, resume
  truncation, commits with checksums), the reader, the value checks that entries list, --mode verify
- the sampling kernels behind rskd.py's targets: the float64 two-level CDF search, the grouped top-k
- one run per output folder (an flock), the stop flag for Ctrl-C/SIGTERM, and one-line messages for
  the errors a user can cause

Every function that finds a problem the user can fix calls die(): one line that says what to do, exit 1.
"""
import argparse
import fcntl
import gc
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, field, fields, replace
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from model import GPT, GPTConfig

HF_TEACHERS = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
# a resumed run must keep these, or its data order and model would silently change
RESUME_FIXED = ('mode', 'n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'gradient_accumulation_steps',
                'max_seqs', 'seed', 'loss', 'cache_dir')


def die(msg):
    """A problem the user can fix: one line that says what to do, no traceback, exit status 1."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def first_line(e):
    return (str(e).splitlines() or [type(e).__name__])[0]

# -----------------------------------------------------------------------------
# the command line and the config


def boolean(s):
    if s.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(s)
    return s.lower() in ('true', '1')


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        die(f"{message} (see --help)")


def opt(default, help, choices=None):
    """A Config field that carries its own --help text and choices."""
    return field(default=default, metadata=dict(help=help, choices=choices))


def parse_args(config_cls, argv, teacher_defaults, description):
    """The options given on the command line, as a dict; one --option per Config field, with the help
    text and choices that the field carries. Defaults are filled in later, per mode."""
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(config_cls):
        extra = f" [teacher: {teacher_defaults[f.name]}]" if f.name in teacher_defaults else ""
        flag = dict(nargs='?', const=True) if f.type is bool else {}  # --resume = --resume true
        choices = f.metadata.get('choices')
        listed = f" ({' | '.join(choices)})" if choices else ""
        p.add_argument(f'--{f.name}', type=boolean if f.type is bool else f.type, default=None, **flag,
                       choices=choices, metavar=f.type.__name__.upper(),
                       help=f"{f.metadata['help']}{listed} (default: {f.default}){extra}")
    return {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}


def resolve_config(config_cls, args, teacher_defaults, formats, objectives):
    """Config from the defaults (the teacher's in --mode teacher), a resumed run's saved config and the
    command line, in that order. Returns (cfg, the checkpoint to resume or None)."""
    mode = args.get('mode', config_cls.mode)
    base = dict(teacher_defaults) if mode == 'teacher' else {}
    ckpt = None
    if mode in ('teacher', 'train'):
        ckpt_path = os.path.join(args.get('out_dir', base.get('out_dir', config_cls.out_dir)), 'ckpt.pt')
        if os.path.isdir(ckpt_path):
            die(f"{ckpt_path} is a folder, not a checkpoint: move it away or use another --out_dir")
        if args.get('resume'):  # the saved run's config, then whatever this command line changes
            ckpt = load_checkpoint(ckpt_path)
            base.update({k: v for k, v in ckpt['config'].items() if k in config_cls.__dataclass_fields__})
            changed = [k for k in RESUME_FIXED if k in args and args[k] != base.get(k)]
            if changed:
                die(f"a resumed run keeps its {', '.join(changed)}: drop them from the command line")
        elif os.path.exists(ckpt_path):
            die(f"{ckpt_path} already exists: continue it with --resume true, or use another --out_dir")
    world = int(os.environ.get('WORLD_SIZE', 1))
    if mode in ('bench', 'verify') and 'RANK' in os.environ:
        die(f"--mode {mode} runs in one process: run it with python, not torchrun")
    if world > 1 and not ckpt and 'gradient_accumulation_steps' not in args:
        args['gradient_accumulation_steps'] = world  # under torchrun: one micro-step per rank by default
    cfg = config_cls(**{**base, **args})
    for method in formats:  # a fork's broken entry is named here, whatever this run does
        check_format(method, formats, config_cls, objectives)
    if cfg.loss not in objectives:
        raise RuntimeError(f"--loss {cfg.loss} has no OBJECTIVES entry: add its loss function there")
    if mode == 'cache' and cfg.method not in formats:  # the cache methods are FORMATS's entries
        die(f"argument --method: invalid choice: {cfg.method!r} (choose from {', '.join(formats)}) (see --help)")
    if mode == 'cache':  # an option that another method records, given to this one, would do nothing
        own = formats[cfg.method]['meta']
        for name in args:
            others = [m for m, f in formats.items() if name in f['meta'] and name not in own]
            if others:
                die(f"--{name} is an option of --method {' or '.join(others)}, not {cfg.method}: drop it, "
                    f"or pass --method {others[0]}")
    check_config(cfg, {f['loss'] for f in formats.values()})
    return cache_decides(cfg, args, formats), ckpt


def cache_decides(cfg, args, formats):
    """In training, the options that shape a cache are the cache's:
    taken from it and printed; refused where the command line says
    otherwise, or where the run reads no cache."""
    options = {'method', 'split'}.union(*(f['meta'] for f in formats.values()))
    given = sorted(options & set(args))
    if cfg.mode not in ('teacher', 'train'):
        return cfg
    if cfg.mode == 'teacher' or cfg.loss not in {f['loss'] for f in formats.values()}:
        if given:
            die(f"--{given[0]} shapes a cache, and this run reads none: drop it")
        return cfg
    if not os.path.isfile(os.path.join(cfg.cache_dir, 'meta.json')):
        return cfg  # (the run says so, once it has checked its data)
    meta = read_cache_meta(cfg.cache_dir, formats)
    taken = {k: meta[k] for k in ('method', *formats[meta['method']]['meta'])}
    for k in given:
        if k not in taken or taken[k] != args[k]:
            die(f"--{k} {args[k]}: a training run takes its targets' options from the cache, "
                f"and {cfg.cache_dir} was made with {k} {taken.get(k, '(none)')}: drop --{k}")
    if os.environ.get('RANK', '0') == '0':
        print(f"from {cfg.cache_dir}: " + ', '.join(f"{k} {v}" for k, v in taken.items()))
    return replace(cfg, **taken)


def check_config(cfg, cached_losses):
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            die(f"--{f.name} must be a finite number, got {value}")
    if not 0 <= cfg.seed < 2 ** 64:
        die(f"--seed must be between 0 and 2**64, got {cfg.seed}")
    folders = ['data_dir'] + (['cache_dir'] if cfg.mode in ('cache', 'verify') else [])
    folders += ['out_dir'] if cfg.mode in ('teacher', 'train', 'bench') else []
    folders += ['cache_dir'] if cfg.mode == 'train' and cfg.loss in cached_losses else []
    for name in folders:
        path = getattr(cfg, name)
        if not path or (os.path.lexists(path) and not os.path.isdir(path)):
            die(f"--{name} {path!r} is not a folder (a file, a broken link or nothing): pass a folder")
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
    if not (0 < cfg.proposal_temperature < math.inf):
        die(f"--proposal_temperature must be a positive number, got {cfg.proposal_temperature}")
    if not re.fullmatch(r'auto|cpu|cuda(:\d+)?', cfg.device):
        die(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device}")
    if cfg.device.startswith('cuda') and 'RANK' not in os.environ:
        gpus = torch.cuda.device_count()
        if gpus <= int(cfg.device[5:] or 0):
            die(f"--device {cfg.device}, but this PyTorch sees {gpus} CUDA GPUs: use --device cpu")


def resolve_dtype(dtype, device):
    """--dtype auto: float32 on CPU; on a GPU bfloat16 where its tensor cores have it (compute
    capability 8.0 on: Ampere, Hopper...), else float16 with a GradScaler. (is_bf16_supported() also
    counts the emulated bfloat16 of a V100 or T4, which crawls.)"""
    if dtype != 'auto':
        return dtype
    if not device.startswith('cuda'):
        return 'float32'
    return 'bfloat16' if torch.cuda.get_device_capability(device)[0] >= 8 else 'float16'


def setup(cfg):
    """The run's environment, one namespace: distributed (under torchrun) or not, rank and world
    size, the device, --dtype resolved, the autocast context and whether to compile."""
    env = SimpleNamespace(ddp='RANK' in os.environ, rank=0, world=1, device=cfg.device)
    if env.ddp:
        use_cuda = torch.cuda.is_available() and cfg.device != 'cpu'
        if 'LOCAL_RANK' not in os.environ:
            die("RANK is set but LOCAL_RANK is not: start distributed runs with torchrun")
        if cfg.device.startswith('cuda') and not use_cuda:
            die(f"--device {cfg.device}, but this PyTorch sees no CUDA GPU: use --device cpu")
        ranks, gpus = int(os.environ.get('LOCAL_WORLD_SIZE', 1)), torch.cuda.device_count()
        if use_cuda and ranks > gpus:  # every rank says so and stops, before any of them waits
            die(f"torchrun started {ranks} processes on this machine, which has {gpus} GPUs: use "
                f"--nproc_per_node {gpus}, or --device cpu")
        dist.init_process_group('nccl' if use_cuda else 'gloo')
        env.rank, env.world = dist.get_rank(), dist.get_world_size()
        env.device = f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else 'cpu'
    elif cfg.device == 'auto':  # (not mps: it has no float64, which sampling and metrics use)
        env.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    env.master, env.type = env.rank == 0, env.device.split(':')[0]
    if env.type == 'cuda':
        if torch.device(env.device).index is not None:  # cuda:N: synchronize, memory stats, names follow
            torch.cuda.set_device(env.device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env.name = torch.cuda.get_device_name(env.device) if env.type == 'cuda' else env.device
    env.dtype = resolve_dtype(cfg.dtype, env.device)
    # autocast runs the matmuls in 16 bits; losses, softmaxes and metrics cast to float32 themselves
    half = env.dtype != 'float32'
    env.ctx = torch.autocast(env.type, dtype=getattr(torch, env.dtype)) if half else nullcontext()
    env.compile = cfg.compile == 'true' or (cfg.compile == 'auto' and env.type == 'cuda')
    return env


def check_model_size(cfg, V, env):
    """Refuse, before allocating it, a model whose weights, gradients and AdamW moments (16 bytes a
    parameter) and one step's float32 logits cannot fit in this machine's (or GPU's) memory."""
    C, L = cfg.n_embd, cfg.n_layer
    params = (V + 63) // 64 * 64 * C + cfg.block_size * C + L * (12 * C * C + 13 * C) + 2 * C
    need = 16 * params + 3 * 4 * cfg.batch_size * cfg.block_size * V
    if env.type == 'cuda':
        have = torch.cuda.get_device_properties(env.device).total_memory
    else:
        have = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    if need > have:
        die(f"a model of {params / 1e6:,.0f}M parameters needs about {need / 2**30:,.0f} GiB for its weights, "
            f"gradients, optimizer state and logits, and this {env.type} has {have / 2**30:,.0f} GiB: use a "
            f"smaller --n_layer, --n_embd or --batch_size")


def check_batching(cfg, world, S):
    """Micro-steps per rank, after checking that a step divides among the ranks and fits the data."""
    if cfg.gradient_accumulation_steps % world:
        die(f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps} must be a multiple of the "
            f"{world} ranks")
    if cfg.batch_size * cfg.gradient_accumulation_steps > S:
        die(f"one step takes {cfg.batch_size * cfg.gradient_accumulation_steps} sequences, the data has {S} of "
            f"{cfg.block_size} tokens: use a smaller --batch_size or --gradient_accumulation_steps")
    return cfg.gradient_accumulation_steps // world

# -----------------------------------------------------------------------------
# JSON files and the data


def read_json(path, what, schema=None):
    """A JSON file of ours: its checksum checked (like every file
    rskd reads back), then its fields against schema, if given."""
    if not os.path.isfile(path):
        gone = 'is a folder, not a file' if os.path.isdir(path) else 'not found'
        die(f"{path} {gone}: {what}")
    with open(path, 'rb') as f:
        d = checked_json(f.read(), path, what)
    return check_fields(d, schema, path, what) or d if schema else d


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


def dumps(d, indent=None):
    """d as JSON that carries its own crc32, as every JSON rskd writes."""
    d = json.loads(json.dumps(d))  # (the values as a reader will see them)
    return json.dumps(dict(d, crc32=digest(d)), indent=indent)


def read_metrics(path):
    """A metrics.jsonl's records, each checked against its crc32."""
    with open(path, 'rb') as f:
        return [checked_json(line, f"{path} line {i}", "it is damaged")
                for i, line in enumerate(f, 1)]


def digest(obj, crc=0):
    """crc32 of obj's contents (dicts, lists, tensors, numbers, text), in
    order: every file rskd writes records it, every read checks it."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            crc = digest(v, zlib.crc32(repr(k).encode(), crc))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            crc = digest(v, crc)
    elif isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().contiguous().view(-1)
        crc = zlib.crc32(flat.view(torch.uint8).numpy(), crc)
    else:
        crc = zlib.crc32(repr(obj).encode(), crc)
    return crc


def check_fields(d, schema, where, what=''):
    if not isinstance(d, dict) or set(d) != set(schema):
        have = set(d) if isinstance(d, dict) else set()
        die(f"{where}: missing fields {sorted(set(schema) - have)}, unexpected fields {sorted(have - set(schema))};"
            f" it was not written by this version of rskd{': ' + what if what else ''}")
    for k, kind in schema.items():
        if isinstance(kind, dict):
            check_fields(d[k], kind, f"{where} field '{k}'", what)
        elif not isinstance(d[k], kind) or (kind is int and isinstance(d[k], bool)):
            die(f"{where}: field '{k}' should be {getattr(kind, '__name__', 'a number')}, found {d[k]!r}")


DATA_META = dict(tokenizer=str, vocab_size=int, eot=int, dtype=str, train_tokens=int, val_tokens=int,
                 train_docs=int, val_docs=int, train_crc32=int, val_crc32=int, val_fraction=(int, float),
                 source=list)
SCANNED = {}  # (path, size, mtime, tokens used) -> (crc32, largest id, sha256 of those tokens)


def gather_on_master(obj, env):
    """Every rank's obj, in rank order, on rank 0 (an empty list elsewhere); [obj] without DDP."""
    if not env.ddp:
        return [obj]
    gathered = [None] * env.world if env.master else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered if env.master else []


def check_data(data_dir, split, T, max_seqs, env):
    """DATA_DIR/split.bin's path, the number of its tokens to use and the vocabulary size, after checking
    meta.json, the file's size, that it holds at least one block, and that every token is below V."""
    meta = read_json(os.path.join(data_dir, 'meta.json'), "run prepare_data.py", DATA_META)
    path, V = os.path.join(data_dir, f'{split}.bin'), meta['vocab_size']
    if not os.path.isfile(path):
        die(f"{path} {'is a folder, not a file' if os.path.isdir(path) else 'not found'}: rerun prepare_data.py")
    size = os.path.getsize(path)
    if size % 2 or size // 2 != meta[f'{split}_tokens']:
        die(f"{path} has {size} bytes, meta.json says {meta[f'{split}_tokens']} uint16 tokens: rerun prepare_data.py")
    n = size // 2
    if max_seqs:
        n = min(n, max_seqs * T + 1)
    if n < T + 1:
        die(f"{path} holds {n} tokens, fewer than one block of {T}+1: use a smaller --block_size or more data")
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, n)

    # one chunked pass, never the whole file in RAM: crc32, largest id, sha256 of the first n tokens.
    # Every rank scans for itself: none waits in a collective (and a watchdog's timeout) for rank 0
    def scan():
        tokens = np.memmap(path, dtype=np.uint16, mode='r', shape=(size // 2,))
        crc, largest, sha = 0, 0, hashlib.sha256()
        for i in range(0, len(tokens), 1 << 24):
            chunk = tokens[i:i + (1 << 24)]
            crc = zlib.crc32(chunk, crc)
            largest = max(largest, int(chunk.max()))
            sha.update(chunk[:max(n - i, 0)].tobytes())
        return crc, largest, sha.hexdigest()
    crc, largest, sha = SCANNED[key] if key in SCANNED else scan()
    if crc != meta[f'{split}_crc32']:
        die(f"{path} does not match the checksum in {data_dir}/meta.json: the file is damaged (or was changed "
            f"after prepare_data.py); rerun prepare_data.py")
    if largest >= V:
        die(f"{path} holds token ids >= vocab_size {V}: it was not made with this tokenizer")
    SCANNED[key] = crc, largest, sha
    return path, n, V


def data_fingerprint(tokens, path, env):
    """{path, n_tokens, sha256 of the tokens used}: a cache records it, training compares it."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, len(tokens))
    if key in SCANNED:  # check_data's pass has hashed them already
        return dict(path=os.path.abspath(path), n_tokens=len(tokens), sha256=SCANNED[key][2])
    h = hashlib.sha256()
    for i in range(0, len(tokens), 1 << 26):
        h.update(tokens[i:i + (1 << 26)].tobytes())
    return dict(path=os.path.abspath(path), n_tokens=len(tokens), sha256=h.hexdigest())


@contextmanager
def replaced(path):
    """A temp file beside path, renamed over it (fsync'd) when the
    block ends, removed if it fails: a reader sees the old file or the
    new one, never half of one."""
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


def write_bytes(data, path):
    need, free = len(data), shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    if need > free:  # (the old file stays until the new one is whole)
        die(f"saving {path} needs {need / 1e6:,.0f} MB free beside the last "
            f"saved one, the disk has {free / 1e6:,.0f} MB: free space and rerun")
    with replaced(path) as f:
        f.write(data)

# -----------------------------------------------------------------------------
# atomic writes, checkpoints and teachers


def write_json(d, path):
    write_bytes(dumps(d, indent=1).encode(), path)


def save_checkpoint(path, model, optimizer, scaler, it, best_val_loss, config, evals):
    """Everything an exact resume needs, and its crc32: the plain model,
    the optimizer's moments, the scaler, the RNG, the step, the config
    and every eval so far (a resume rebuilds metrics.jsonl from them).
    Serialised in memory first: a full disk is then an OSError."""
    state = dict(model=model.state_dict(), model_config=asdict(model.config),
                 optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                 rng=torch.get_rng_state(), iter_num=it, best_val_loss=best_val_loss,
                 config=config, evals=evals)
    state['crc32'] = digest(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(buffer.getbuffer(), path)


def restore(ckpt, model, optimizer, scaler, inputs, cfg):
    """Load a checkpoint into a new run: (iteration, best val loss).
    The run must read the inputs the saved one did (data, cache,
    teacher: each {path, sha256})."""
    path = ckpt['path']
    for kind, now in inputs.items():
        was = ckpt['config'].get('inputs', {}).get(kind)
        if was and now and was['sha256'] != now['sha256']:
            die(f"{path} was trained with other {kind} ({was.get('path') or was['name']}) than "
                f"this run's {now.get('path') or now['name']}: resume it with its own {kind}")
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


def start_metrics(metrics_path, ckpt):
    """The evals so far, and metrics.jsonl rewritten to hold exactly
    those: none for a new run; a resumed run's from its checkpoint
    (whatever a kill left after it, or before a line was appended)."""
    evals = ckpt['evals'] if ckpt else []
    write_bytes(''.join(dumps(e) + '\n' for e in evals).encode(), metrics_path)
    return list(evals)


def last_good(ckpt_path):
    if os.path.exists(ckpt_path):
        return f"{ckpt_path} holds the last good state"
    return "nothing was saved"


def log_eval(metrics_path, record):
    """Append one eval's JSON line to metrics.jsonl (after its checkpoint is saved) and print it."""
    with open(metrics_path, 'a') as f:
        f.write(dumps(record) + '\n')
        f.flush()
        os.fsync(f.fileno())
    shown = ('val_loss', 'val_ppl', 'ece', 'kl_teacher', 'spec_accept')
    print(f"eval {record['iter']}: " + ', '.join(f"{k} {record[k]:.4f}" for k in shown if k in record))


def log_step(it, loss, lr, dt, step_time, tokens_per_step, model, cfg, env):
    """The training line: loss, learning rate, this step's time and tok/s, the MFU (on GPUs of a known
    peak), and the ETA from the mean step time."""
    tok_s = tokens_per_step / dt
    mfu = model.estimate_mfu(tok_s / env.world, env.name, env.dtype)
    mfu = f", mfu {mfu:.1%}" if mfu else ''
    print(f"iter {it}/{cfg.max_iters}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms, {tok_s:,.0f} tok/s"
          f"{mfu}, ETA {(cfg.max_iters - it) * step_time:.0f}s", flush=True)


def check_val_loss(val_loss, it, ckpt_path):
    if not math.isfinite(val_loss):
        die(f"the val loss is {val_loss} at iter {it}: not saved, {last_good(ckpt_path)}")


def check_step(loss, grad_norm, scaled, it, ckpt_path):
    """Stop before an update from a non-finite loss or gradient (fp16's
    GradScaler skips overflowed steps itself: then only the loss counts)."""
    if not math.isfinite(loss) or (not scaled and not math.isfinite(grad_norm)):
        die(f"the loss became {loss} (gradient norm {grad_norm}) at iter {it}; "
            f"stopped before the update, {last_good(ckpt_path)}. Lower "
            f"--learning_rate or check the data and cache")


def load_checkpoint(path):
    """A checkpoint of ours, checked against its crc32. weights_only:
    tensors, dicts and numbers only, so that a file cannot run code."""
    if not os.path.isfile(path):
        die(f"checkpoint {path} not found: train it first (--mode teacher or "
            f"--mode train) or fix the path")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        crc = ckpt.pop('crc32')
        assert {'model', 'model_config', 'config', 'iter_num'} <= set(ckpt)
    except Exception as e:
        die(f"{path} is not a valid rskd checkpoint ({type(e).__name__}): it "
            f"is damaged or not ours")
    if crc != digest(ckpt):
        die(f"{path} does not match its checksum: it is damaged; use a copy, "
            f"or train it again")
    return dict(ckpt, path=path, loaded_mtime=os.stat(path).st_mtime_ns)


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
        except Exception as e:  # no network, no weights, damaged ones
            die(f"could not load the weights of Hugging Face teacher {name}: {first_line(e)}")
    else:
        try:
            model = GPT(GPTConfig(**shape))
            model.load_state_dict(ckpt['model'])
        except (TypeError, RuntimeError):
            die(f"{name} does not hold the weights of a model.py GPT: it is not a teacher checkpoint")
    if not all(bool(p.isfinite().all()) for p in model.parameters()):
        die(f"teacher {name} has weights that are not finite: it is damaged")
    info = dict(name=name, sha256=weights_sha256(model))
    return model.to(env.device).to_teacher(env.dtype), info  # frozen; float32 logits


def find_teacher(cfg, required, cache_meta, vocab_size, env):
    """(teacher, {name, sha256}): the cache's own teacher if it still exists, else --teacher (none in
    --mode teacher); (None, None) with a note when the run needs it only for metrics. A cache's
    teacher must be the one it was made from."""
    names = [cfg.teacher] if cfg.mode == 'train' else []
    if cache_meta:
        names = [cache_meta['teacher']['name'], cfg.teacher]
    cache_dir, block_size = cfg.cache_dir, cfg.block_size
    hf_ok = importlib.util.find_spec('transformers') is not None
    found = [n for n in names if (n in HF_TEACHERS and hf_ok) or os.path.exists(n)]
    if not found and not required:
        if names and env.master:
            print(f"note: teacher {names[-1]} not found, so no kl_teacher/spec_accept metrics")
        return None, None
    teacher, info = load_teacher((found or names)[0], vocab_size, block_size, env)
    if cache_meta and info['sha256'] != cache_meta['teacher']['sha256']:
        die(f"teacher {info['name']} is not the one {cache_dir} was made from: pass that one with --teacher")
    return teacher, info

# -----------------------------------------------------------------------------
# the cache on disk: meta.json, and the files that an entry of rskd.FORMATS describes. Nothing here
# knows a method or a format's file: the entry says it all. The layout's own files are seq_offsets
# (ragged formats: where each sequence's entries start) and checksums (a crc32 per sequence).


CACHE_META = dict(format=str, version=int, method=str, vocab_size=int, block_size=int, num_seqs=int, seed=int,
                  split=str, teacher=dict(name=str, sha256=str), data=dict(path=str, n_tokens=int, sha256=str),
                  ids_dtype=str, dtype=str, device=str, device_name=str, batch_size=int, torch=str,
                  complete=bool, seqs_done=int, entries=int)
# recorded, not compared on resume: on CUDA the draws depend on the GPU model, the batch size (kernel
# choice) and the torch version, so a cache resumed with others is exact but not bit-identical
RECORDED = ('device_name', 'batch_size', 'torch')
PROGRESS = ('complete', 'seqs_done', 'entries')
FORMAT_KEYS = ('target', 'loss', 'unbiased', 'meta', 'files', 'ragged', 'weights')

# The value checks a FORMATS entry lists for its files. Each takes (values, starts, meta): a batch's
# values of one file (numpy), the index of each position's first value among them, and the cache's
# meta.json; True if every value is one rskd writes.


def in_vocab(a, starts, meta):
    """token ids: 0 <= id < vocab_size"""
    return a.size == 0 or bool(a.min() >= 0 and a.max() < meta['vocab_size'])


def at_least_1(a, starts, meta):
    return bool((a >= 1).all())


def positive(a, starts, meta):
    """finite and > 0"""
    return bool(np.isfinite(a).all() and (a > 0).all())


def probability(a, starts, meta):
    """finite, in [0, 1]"""
    return bool(np.isfinite(a).all() and (a >= 0).all() and (a <= 1).all())


def ordered(a, starts, bad):
    """False if bad(next - this) holds for two neighbours within a position"""
    within = np.ones(len(a), bool)
    within[starts] = False  # a position's first value follows the previous position's
    return not bad(np.diff(a.astype(np.float64)))[within[1:]].any()


def ascending(a, starts, meta):
    """strictly ascending within each position"""
    return ordered(a, starts, lambda step: step <= 0)


def descending(a, starts, meta):
    """not ascending anywhere within a position"""
    return ordered(a, starts, lambda step: step > 0)


def sums_to(option):
    """each position's values sum to the cache's option (such as rounds)"""
    def check(a, starts, meta):
        return a.size == 0 or bool((np.add.reduceat(a.astype(np.int64), starts) == meta[option]).all())
    check.__name__ = f'sums_to_{option}'
    return check


def check_format(method, formats, config_cls=None, objectives=None):
    """A FORMATS entry holds every piece the pipeline uses, each file has a dtype, a width and value
    checks: whatever a fork leaves out stops here, named, before a cache is written or read."""
    fmt = formats[method]
    where = f"FORMATS['{method}']"
    missing = [k for k in FORMAT_KEYS if k not in fmt]
    if missing:
        raise RuntimeError(f"{where} has no {', '.join(missing)}: every entry needs {', '.join(FORMAT_KEYS)}")
    if objectives is not None and fmt['loss'] not in objectives:
        raise RuntimeError(f"{where} trains with loss {fmt['loss']!r}, which has no OBJECTIVES entry")
    for name, kind in fmt['meta'].items():
        if name in CACHE_META:
            raise RuntimeError(f"{where}: every cache records {name} already: drop it from its meta")
        field = config_cls and config_cls.__dataclass_fields__.get(name)
        if config_cls and (not field or field.type is not kind):
            raise RuntimeError(f"{where}: its meta option {name} ({kind.__name__}) needs a Config field "
                               f"of the same type")
    for name, spec in fmt['files'].items():
        if not isinstance(spec, tuple) or len(spec) != 3:
            raise RuntimeError(f"{where}: file '{name}' must be (dtype, per, checks)")
        dtype, per, checks = spec
        if not isinstance(checks, (list, tuple)) or not checks or not all(callable(c) for c in checks):
            raise RuntimeError(f"{where}: file '{name}' has no value checks: list what its values must satisfy "
                               f"(in_vocab, positive, ... in guardrails.py, or a function of your own)")
        if dtype != 'ids':
            try:
                np.dtype(dtype)
            except TypeError:
                raise RuntimeError(f"{where}: file '{name}' has dtype {dtype!r}, which numpy does not know")
        if per not in ('position', 'entry') and fmt['meta'].get(per) is not int:
            raise RuntimeError(f"{where}: file '{name}' has per={per!r}: use 'position', 'entry' or an "
                               f"int option of its meta")
        if name in ('seq_offsets', 'checksums', 'meta'):
            raise RuntimeError(f"{where}: '{name}' is a file of every cache: give yours another name")
    ragged = fmt['ragged']
    if ragged is not None and fmt['files'].get(ragged, (0, 0))[1:2] != ('position',):
        raise RuntimeError(f"{where}: ragged={ragged!r} must name its file of one count per position")
    if ragged is None and any(per == 'entry' for _, per, _ in fmt['files'].values()):
        raise RuntimeError(f"{where} has files per 'entry': name the file that counts them in ragged=")
    return fmt


class RecordedOptions(SimpleNamespace):
    def __getattr__(self, name):  # (only called for a name that is not there)
        raise AttributeError(f"a target function read cfg.{name}, which its FORMATS entry's meta does not "
                             f"record: add {name} there, so that the cache records it and a resume with "
                             f"another value is refused")


def recorded_options(cfg, fmt):
    """The options a cache's target function may read: exactly those its meta.json records (its
    FORMATS entry's 'meta'), so that no option that shapes a cache goes unrecorded."""
    common = ('seed', 'block_size', 'split')  # (every cache records these)
    return RecordedOptions(**{name: getattr(cfg, name) for name in (*common, *fmt['meta'])})


def cache_files(meta, formats):
    """name -> (numpy dtype, per) of each file of a cache, in checksum order: its format's files, then
    seq_offsets (ragged formats) and checksums."""
    fmt = check_format(meta['method'], formats)
    files = {name: (meta['ids_dtype'] if dtype == 'ids' else dtype, per)
             for name, (dtype, per, _) in fmt['files'].items()}
    if fmt['ragged']:
        files['seq_offsets'] = ('uint64', 'sequence')
    files['checksums'] = ('uint32', 'crc')
    return files


def width(meta, per):
    """Values per position of a fixed-width file: 1, or the option that per names (k)."""
    return 1 if per == 'position' else meta[per]


def file_sizes(meta, formats):
    """Each file's numpy dtype and number of elements once meta['seqs_done'] sequences are written."""
    P, S = meta['seqs_done'] * meta['block_size'], meta['seqs_done']
    count = dict(entry=meta['entries'], sequence=S + 1, crc=S)
    return {name: (dtype, count[per] if per in count else P * width(meta, per))
            for name, (dtype, per) in cache_files(meta, formats).items()}


def sequence_crcs(arrays, units, meta, seqs, base):
    """crc32 of each sequence in seqs over its bytes in every file, in file order. arrays[name] holds
    the file's elements from global element base[name] on; in a ragged format arrays['seq_offsets']
    gives where each sequence's entries start. The writer and the reader both use this."""
    crcs = []
    offsets, first = arrays.get('seq_offsets'), base.get('seq_offsets', 0)
    T = meta['block_size']
    for s in seqs:
        crc = 0
        for name, (_, per) in units.items():
            if per == 'entry':
                lo, hi = int(offsets[s - first]), int(offsets[s + 1 - first])
                if not 0 <= hi - lo <= T * 255:  # damaged offsets: read nothing
                    crc = -1
                    break
            elif per == 'sequence':  # the sequence's own start and end
                lo, hi = s, s + 2
            elif per == 'crc':
                continue
            else:
                n = T * width(meta, per)
                lo, hi = s * n, (s + 1) * n
            crc = zlib.crc32(np.ascontiguousarray(arrays[name][lo - base[name]:hi - base[name]]), crc)
        crcs.append(crc)
    return crcs


def failed_check(meta, fmt, rows):
    """The format's value checks on a batch's rows (name -> numpy array): None if every one holds,
    else which one failed."""
    for name, (_, per, checks) in fmt['files'].items():
        values = rows[name]
        if per == 'entry':  # ragged: each position's count of entries is in fmt['ragged']
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


def damaged(cache_dir, seqs):
    """The message for damaged sequences: which ones, and what to do."""
    ranges = to_ranges(seqs)
    shown = ', '.join(f"{a}-{b}" if a != b else f"{a}" for a, b in ranges[:5]) + (", ..." if len(ranges) > 5 else "")
    return (f"{cache_dir} is damaged: sequence(s) {shown} do not match their checksums or hold values rskd "
            f"never writes; run --mode verify --cache_dir {cache_dir} to list every damaged range, then make "
            f"the cache again with --mode cache (into an empty --cache_dir)")


def to_ranges(seqs):
    """Sorted sequence numbers -> [(first, last), ...] of consecutive runs."""
    ranges = []
    for s in seqs:
        if ranges and s == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], s)
        else:
            ranges.append((s, s))
    return ranges


def read_cache_meta(cache_dir, formats):
    """CACHE_DIR/meta.json, checked against its checksum, the common
    schema and its method's own fields."""
    path = os.path.join(cache_dir, 'meta.json')
    if not os.path.exists(path):
        die(f"no cache in {cache_dir}: make one with --mode cache --cache_dir {cache_dir}")
    fix = "pass another --cache_dir, or make the cache again into an empty one"
    meta = read_json(path, fix)
    method = meta.get('method')
    if meta.get('format') != 'rskd-cache' or meta.get('version') != 3:
        die(f"{cache_dir} holds no cache of this version of rskd: {fix}")
    if not isinstance(method, str) or method not in formats:
        die(f"{path} has method {method!r}, not {' or '.join(formats)}: {fix}")
    fmt = check_format(method, formats)
    return read_json(path, fix, {**CACHE_META, **fmt['meta']})


def cache_memmaps(cache_dir, meta, formats, tail_ok=False):
    """The cache's files, memory-mapped, after checking each one's size against meta.json. tail_ok:
    an incomplete cache's files may run past the last commit (a rerun cuts that off); only the
    committed part is mapped."""
    mm = {}
    for name, (dt, n) in file_sizes(meta, formats).items():
        path = os.path.join(cache_dir, f'{name}.bin')
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        if size != n * np.dtype(dt).itemsize and not (tail_ok and size > n * np.dtype(dt).itemsize):
            die(f"{path} does not have the size {cache_dir}/meta.json gives: the cache is damaged; make "
                f"it again with --mode cache into an empty --cache_dir")
        mm[name] = np.memmap(path, dtype=dt, mode='r', shape=(n,)) if n else np.zeros(0, dt)
    return mm


def read_rows(mm, units, meta, seqs):
    """The stored elements of sequences seqs, file by file (no offsets, no checksums)."""
    rows, T = {}, meta['block_size']
    for name, (_, per) in units.items():
        if per == 'entry':  # ragged: sequence s's entries lie between seq_offsets[s] and [s+1]
            spans = [(int(mm['seq_offsets'][s]), int(mm['seq_offsets'][s + 1])) for s in seqs]
            if any(not 0 <= a <= b <= min(len(mm[name]), a + T * 255) for a, b in spans):
                spans = [(0, 0)] * len(spans)  # damaged offsets: the checksums report them
        elif per in ('sequence', 'crc'):
            continue
        else:  # fixed width: the file's size (checked) bounds these
            n = T * width(meta, per)
            spans = [(s * n, (s + 1) * n) for s in seqs]
        rows[name] = np.concatenate([mm[name][a:b] for a, b in spans])
    return rows


def bad_sequences(mm, units, meta, fmt, seqs, rows):
    """The sequences of seqs whose bytes fail their checksum or whose values fail the format's checks."""
    crcs = sequence_crcs(mm, units, meta, seqs, {name: 0 for name in units})
    bad = {s for s, crc in zip(seqs, crcs) if crc != mm['checksums'][s]}
    if not bad and failed_check(meta, fmt, rows):  # find which, one by one
        bad = {s for s in seqs if failed_check(meta, fmt, read_rows(mm, units, meta, [s]))}
    elif bad:
        whole = [s for s in seqs if s not in bad]
        if whole and failed_check(meta, fmt, read_rows(mm, units, meta, whole)):
            bad |= {s for s in whole if failed_check(meta, fmt, read_rows(mm, units, meta, [s]))}
    return sorted(bad)


def cache_reader(cfg, loss, V, data, formats, checked=True):
    """(meta, read) for a training run: read(seqs) gives the batch's stored values, name -> tensor (ids
    as int64), from the memory-mapped files; checked against their checksums and the format's values
    before any step uses them (damage stops the run with one line)."""
    meta = read_cache_meta(cfg.cache_dir, formats)
    check_cache_for_run(meta, cfg, loss, V, data, formats)  # complete, for this loss, T and data
    mm = cache_memmaps(cfg.cache_dir, meta, formats)  # each file's size checked against meta.json
    fmt, units = formats[meta['method']], cache_files(meta, formats)
    about = hashlib.sha256(json.dumps({k: meta[k] for k in meta if k not in RECORDED}).encode())
    about.update(mm['checksums'].tobytes())  # what a resume of the run compares
    meta['identity'] = dict(name=os.path.abspath(cfg.cache_dir), sha256=about.hexdigest())
    ids = [name for name, (dtype, _, _) in fmt['files'].items() if dtype == 'ids']

    def read(seqs):
        rows = read_rows(mm, units, meta, seqs)
        if checked:
            bad = bad_sequences(mm, units, meta, fmt, seqs, rows)
            if bad:
                die(damaged(cfg.cache_dir, bad))
        return {name: torch.from_numpy(a.astype(np.int64) if name in ids else a) for name, a in rows.items()}
    return meta, read


def verify_cache(cfg, env, formats):
    """--mode verify: every committed sequence of CACHE_DIR against its checksum and the format's
    values, and the data in --data_dir against its own checksum and the cache's fingerprint. Lists
    every damaged range; exits 1 if there is one."""
    meta = read_cache_meta(cfg.cache_dir, formats)
    mm = cache_memmaps(cfg.cache_dir, meta, formats, tail_ok=not meta['complete'])
    units, S, T = cache_files(meta, formats), meta['seqs_done'], meta['block_size']
    fmt = formats[meta['method']]
    if not meta['complete']:
        print(f"note: {cfg.cache_dir} is incomplete: its {S:,} committed sequences are verified, and "
              f"--mode cache resumes it")
    split = os.path.join(cfg.data_dir, f"{meta['split']}.bin")
    if os.path.isfile(os.path.join(cfg.data_dir, 'meta.json')):
        # the tokens it covers: all of the split, or the first max_seqs * T + 1 (--max_seqs)
        n_file = os.path.getsize(split) // 2 if os.path.isfile(split) else 0
        max_seqs = 0 if meta['data']['n_tokens'] == n_file else (meta['data']['n_tokens'] - 1) // T
        path, n, _ = check_data(cfg.data_dir, meta['split'], T, max_seqs, env)
        tokens = np.memmap(path, dtype=np.uint16, mode='r', shape=(n,))
        if data_fingerprint(tokens, path, env)['sha256'] != meta['data']['sha256']:
            die(f"{cfg.cache_dir} was made from other tokens than {path}'s: pass the --data_dir it was made from")
        print(f"verify: {path} matches its checksum and the cache's data fingerprint")
    else:
        print(f"note: no data in --data_dir {cfg.data_dir}, so only the cache itself is verified")
    bad, t0 = [], time.time()
    progress = progress_printer('verify', 'positions', 0, S * T)
    for lo in range(0, S, 1024):
        seqs = list(range(lo, min(lo + 1024, S)))
        bad += bad_sequences(mm, units, meta, fmt, seqs, read_rows(mm, units, meta, seqs))
        progress(seqs[-1] * T + T)
    size = sum(os.path.getsize(os.path.join(cfg.cache_dir, f'{name}.bin')) for name in units)
    dt = max(time.time() - t0, 1e-9)
    for a, b in to_ranges(bad):
        print(f"damaged: sequences {a}-{b} (positions {a * T:,}-{(b + 1) * T - 1:,})")
    if bad:
        die(f"{cfg.cache_dir}: {len(bad):,} of {S:,} sequences are damaged, in the {len(to_ranges(bad))} "
            f"ranges above: make the cache again with --mode cache (into an empty --cache_dir)")
    print(f"verify: {cfg.cache_dir} is intact: {S:,} sequences{'' if meta['complete'] else ' (so far)'}, "
          f"{size / 1e6:,.1f} MB in {dt:.1f}s ({size / 1e6 / dt:,.0f} MB/s)")


def resume_cache(cache_dir, meta, formats, env):
    """The progress saved in CACHE_DIR/meta.json when it holds the same cache, else the new meta. A
    cache made differently (teacher, data, method, options) is refused; a complete one is checked."""
    if not os.path.exists(os.path.join(cache_dir, 'meta.json')):  # every rank checks, all stop together
        return meta
    old = read_cache_meta(cache_dir, formats)
    for key in meta:
        a, b = old.get(key), meta[key]
        if key in RECORDED and a != b and meta['device'] == 'cuda' and env.master:
            print(f"note: {cache_dir} was started with {key} {a}, now {b}: on CUDA the rest will not be "
                  f"bit-identical to an uninterrupted cache (its draws are still exact)")
        if key not in PROGRESS + RECORDED and (a.get('sha256') != b['sha256'] if key in ('teacher', 'data') else a != b):
            die(f"{cache_dir} holds a cache made with a different {key} ({a} vs now {b}): use another "
                f"--cache_dir, or move it away to start over")
    if old['complete']:
        cache_memmaps(cache_dir, old, formats)  # its files are whole
        if env.master:
            print(f"{cache_dir} is complete ({old['num_seqs']} sequences): nothing to do")
    return old


def write_cache(cfg, env, formats, S, V, teacher, data):
    """--mode cache's writer. A new cache gets its meta.json (what it holds, what made it, how far it
    got) and empty files; an interrupted one is cut back to its last commit and resumed. Returns None
    when the cache is complete already, else a CacheWriter."""
    fmt = check_format(cfg.method, formats)
    for per in {per for _, per, _ in fmt['files'].values()} - {'position', 'entry'}:
        if not 1 <= getattr(cfg, per) <= V:  # (--k: no more ids per position than the vocabulary has)
            die(f"--{per} must be 1 to the vocabulary size {V}, got {getattr(cfg, per)}")
    meta = dict(format='rskd-cache', version=3, method=cfg.method, vocab_size=V, block_size=cfg.block_size,
                num_seqs=S, seed=cfg.seed, split=cfg.split, teacher=teacher, data=data,
                ids_dtype='uint16' if V <= 65536 else 'int32', dtype=env.dtype, device=env.type,
                device_name=env.name, batch_size=cfg.batch_size, torch=torch.__version__,
                complete=False, seqs_done=0, entries=0)
    meta.update({name: getattr(cfg, name) for name in fmt['meta']})  # the options its target reads
    meta = resume_cache(cfg.cache_dir, meta, formats, env)  # its saved progress; refuses another cache
    return None if meta['complete'] else CacheWriter(cfg, env, meta, formats)


class CacheWriter:
    """Appends each batch's parts and commits them: the data and checksums made durable, then
    meta.json, which never runs ahead of the data. .start is the first sequence still to do."""

    def __init__(self, cfg, env, meta, formats):
        self.cfg, self.env, self.meta, self.fmt = cfg, env, meta, formats[meta['method']]
        self.units = cache_files(meta, formats)
        self.handles = open_cache_files(cfg.cache_dir, meta, formats, env)  # rank 0's; cut to last commit
        self.pending, self.start = [], meta['seqs_done']
        self.t0 = self.committed = time.time()
        T = meta['block_size']
        self.progress = progress_printer('cache', 'positions', self.start * T, meta['num_seqs'] * T)

    def add(self, part, seqs, done):
        """part: the target's dict for this rank's sequences seqs (None if it has none); done: the
        sequences finished once every rank's part of this round is in."""
        if part is not None:
            part = self.checked(part, len(seqs))
        self.pending += gather_on_master(part, self.env)  # rank 0 gets all, in rank order = sequence order
        due = done == self.meta['num_seqs'] or time.time() - self.committed >= self.cfg.commit_seconds
        if self.env.master and due:
            commit_chunk(self.handles, self.pending, self.meta, done, self.cfg.cache_dir, self.fmt)
            self.pending, self.committed = [], time.time()
            self.progress(self.meta['seqs_done'] * self.meta['block_size'])

    def checked(self, part, n):
        """The target's tensors as the files' numpy arrays, after checking them against the entry: a
        fork's target that returns other files, sizes or values than its entry says is named here."""
        where, T = f"FORMATS['{self.meta['method']}']: its target", self.meta['block_size']
        if set(part) != set(self.fmt['files']) or not all(isinstance(t, torch.Tensor) for t in part.values()):
            raise RuntimeError(f"{where} must return exactly its files {sorted(self.fmt['files'])} as tensors, "
                               f"not {sorted(part)}")
        raw = {name: t.detach().cpu().numpy().reshape(-1) for name, t in part.items()}
        arrays = {name: a.astype(self.units[name][0]) for name, a in raw.items()}
        for name, (_, per, _) in self.fmt['files'].items():
            want = int(arrays[self.fmt['ragged']].sum()) if per == 'entry' else n * T * width(self.meta, per)
            if len(arrays[name]) != want:
                raise RuntimeError(f"{where} gave {len(arrays[name])} values of '{name}' for {n} sequences, "
                                   f"not {want}")
            if arrays[name].dtype.kind in 'ui' and not np.array_equal(arrays[name], raw[name]):
                raise RuntimeError(f"{where} gave values of '{name}' that its dtype {arrays[name].dtype} "
                                   f"cannot hold")
        failed = failed_check(self.meta, self.fmt, arrays)
        if failed:
            raise RuntimeError(f"{where} gave values that {failed} refuses")
        return arrays

    def finish(self):
        return finish_cache(self.handles, self.meta, self.cfg.cache_dir, self.start, self.t0, self.env)


def open_cache_files(cache_dir, meta, formats, env):
    """Rank 0's append handles, name -> (file, dtype, per). A new cache's files hold what file_sizes
    gives for no sequences: nothing, or seq_offsets' leading 0. On resume the files are cut back to what
    meta.json has committed, and a chunk written after the last commit is redone."""
    sizes = file_sizes(meta, formats)
    units = cache_files(meta, formats)
    files = {name: (os.path.join(cache_dir, f'{name}.bin'), dt, n) for name, (dt, n) in sizes.items()}
    meta_path = os.path.join(cache_dir, 'meta.json')
    if env.master:
        os.makedirs(cache_dir, exist_ok=True)
        for name, (path, dt, n) in files.items():
            if not meta['seqs_done']:  # a new cache: empty files, and the first sequence starts at entry 0
                with open(path, 'wb') as f:
                    f.write(np.zeros(n, dt).tobytes())
            elif os.path.exists(path) and os.path.getsize(path) >= n * np.dtype(dt).itemsize:
                with open(path, 'r+b') as f:  # resume: cut any tail written after the last commit
                    f.truncate(n * np.dtype(dt).itemsize)
            else:
                die(f"{path} is shorter than {meta_path} says: the cache is damaged; make it again in an empty --cache_dir")
        if meta['seqs_done']:
            print(f"resuming {cache_dir} at sequence {meta['seqs_done']}/{meta['num_seqs']}")
        else:
            write_json(meta, meta_path)
    if env.ddp:
        dist.barrier()
    if not env.master:
        return {}
    # unbuffered: a failed commit leaves no bytes in Python's buffers, to land later behind a resume
    return {name: (open(path, 'ab', buffering=0), dt, units[name][1]) for name, (path, dt, n) in files.items()}


def commit_chunk(handles, parts, meta, seqs_done, cache_dir, fmt):
    """Append the parts (one per rank, in sequence order; None for a rank without sequences) to their
    files, each sequence's crc32 to checksums.bin, make them all durable, then record seqs_done in
    meta.json: meta.json never runs ahead of the data."""
    units = {name: (dt, per) for name, (_, dt, per) in handles.items()}
    T, ragged = meta['block_size'], fmt['ragged']
    # entries: the values of the first ragged file (or of the first file) per sequence
    counted = next((n for n, (_, per) in units.items() if per == 'entry'), next(iter(units)))
    arrays = {name: [] for name in handles}
    first = meta['seqs_done']
    for part in filter(None, parts):
        one_per_position = next(n for n, (_, per) in units.items() if per not in ('entry', 'sequence', 'crc'))
        n = len(part[one_per_position]) // (T * width(meta, units[one_per_position][1]))  # sequences in it
        base = {name: first * T * width(meta, per) for name, (_, per) in units.items()
                if per not in ('entry', 'sequence', 'crc')}
        base.update({name: meta['entries'] for name, (_, per) in units.items() if per == 'entry'})
        if ragged:  # each sequence's start, then where each one ends
            per_seq = part[ragged].reshape(n, -1).sum(1, dtype=np.uint64)
            part['seq_offsets'] = meta['entries'] + np.concatenate([[0], np.cumsum(per_seq)]).astype(np.uint64)
            base['seq_offsets'] = first
        crcs = sequence_crcs(part, units, meta, range(first, first + n), base)
        part = dict(part, checksums=np.array(crcs, dtype=np.uint32))
        if ragged:
            part['seq_offsets'] = part['seq_offsets'][1:]  # the file holds the leading 0 already
        for name in handles:
            arrays[name].append(part[name])
        meta['entries'] += len(part[counted])
        first += n
    for name, (f, dt, _) in handles.items():  # (a failed write: entry_point says so; a rerun cuts it off)
        for a in arrays[name]:
            data = memoryview(a.astype(dt).tobytes())
            while data:  # an unbuffered write may take only part
                data = data[f.write(data):]
    for f, _, _ in handles.values():
        f.flush()
        os.fsync(f.fileno())
    meta['seqs_done'] = seqs_done
    meta['complete'] = seqs_done == meta['num_seqs']
    write_json(meta, os.path.join(cache_dir, 'meta.json'))


def finish_cache(handles, meta, cache_dir, start, t0, env):
    """The caching loop's throughput (tok/s, for the bench); rank 0 closes the files and prints the
    cache's size per position."""
    if env.type == 'cuda':
        torch.cuda.synchronize()
    tok_s = (meta['num_seqs'] - start) * meta['block_size'] / (time.time() - t0)
    if not env.master:
        return tok_s
    for f, _, _ in handles.values():
        f.close()
    P = meta['num_seqs'] * meta['block_size']
    size = sum(os.path.getsize(os.path.join(cache_dir, f'{name}.bin')) for name in handles)
    ragged = any(per == 'entry' for _, _, per in handles.values())
    unique = f"{meta['entries'] / P:.2f} unique tokens/position, " if ragged else ""
    print(f"cache complete: {cache_dir}, {P:,} positions, {unique}{size / P:.2f} bytes/position, "
          f"{size / 1e6:.1f} MB, {tok_s:,.0f} tok/s")
    return tok_s


def check_cache_for_run(meta, cfg, loss, V, data, formats):
    """A training run may read this cache: complete, and made for this loss, block size, vocabulary and data."""
    T, fix = cfg.block_size, f"make a matching one with --mode cache --cache_dir {cfg.cache_dir}"
    if formats[meta['method']]['loss'] != loss:
        want = ' or '.join(m for m, f in formats.items() if f['loss'] == loss)
        die(f"{cfg.cache_dir} is a {meta['method']} cache, --loss {loss} needs a {want} cache: pass another --cache_dir")
    if not meta['complete']:
        die(f"{cfg.cache_dir} is incomplete ({meta['seqs_done']}/{meta['num_seqs']} sequences): rerun --mode cache to finish it")
    if meta['block_size'] != T:
        die(f"{cfg.cache_dir} was made with block_size {meta['block_size']}, this run uses {T}: pass --block_size {meta['block_size']}")
    if meta['split'] != 'train' or meta['vocab_size'] != V:
        die(f"{cfg.cache_dir} holds {meta['split']} targets over {meta['vocab_size']} tokens, not train over {V}: {fix}")
    if (meta['data']['n_tokens'], meta['data']['sha256']) != (data['n_tokens'], data['sha256']):
        die(f"{cfg.cache_dir} was made from other training data ({meta['data']['n_tokens']:,} tokens of "
            f"{meta['data']['path']}, this run uses {data['n_tokens']:,}; check --data_dir and --max_seqs): {fix}")


# -----------------------------------------------------------------------------
# exact and fast sampling: the kernels behind rskd.py's sparse targets. Tokens are grouped in G groups
# of ~16, token j in group j % G, so that a (V // G, G) view reduces every group in one pass.


def invert_cdf(p, points, group_size=16):
    """The token at each point: p (rows, V), unnormalised probabilities; points (rows, N) in (0, 1].
    Point u picks the token i whose interval (cdf[i-1], cdf[i]] holds u * sum(p): token i with
    probability p_i / sum(p). The CDF has two levels, accumulated in float64: the group that holds the
    point, then the token in it. A flat float32 CDF would lose probabilities below ~1e-8, and rounding
    could land a point on a token of probability 0: here it never does."""
    V = p.shape[-1]
    mass = group_reduce(p, 'sum', group_size)  # (rows, G)
    cdf = mass.cumsum(-1, dtype=torch.float64)
    total = cdf[:, -1:]
    if not bool(((total > 0) & (total < math.inf)).all()):  # nothing to draw from (one sync)
        die("a row to sample has no finite mass: the teacher's probabilities are not finite, or a "
            "--proposal_temperature far from 1 underflowed them; use one closer to 1")
    points = points * total  # (rows, N)
    group = torch.searchsorted(cdf, points).clamp_(max=cdf.shape[-1] - 1)  # the first cdf >= point
    cols = group_members(group, V, group_size)  # (rows, N, members)
    vals = p.gather(-1, cols.clamp(max=V - 1).flatten(1)).view(cols.shape).double()
    inner = vals.masked_fill_(cols >= V, 0).cumsum(-1)  # the group's own CDF
    # where the point lies in its group: cdf[group] is the group's END, so (point - end) / mass is in
    # (-1, 0], and + 1 makes it the share of the group's mass below the point; rescaled to the inner
    # CDF and kept in (0, total], so that it never lands on a zero-probability token
    offset = (points - cdf.gather(-1, group)) / mass.gather(-1, group) + 1
    offset = (offset * inner[..., -1]).clamp_(min=torch.finfo(torch.float64).tiny)
    offset = torch.minimum(offset, inner[..., -1])
    member = torch.searchsorted(inner, offset.unsqueeze(-1))  # (rows, N, 1)
    return cols.gather(-1, member).squeeze(-1)


def group_reduce(probs, op, group_size=16):
    """(..., V) -> (..., G): the 'sum' or 'max' of each group. One pass over a (V // G, G) view, then
    the last V % G tokens join the first groups."""
    reduce, combine = (torch.sum, torch.add) if op == 'sum' else (torch.amax, torch.maximum)
    V = probs.shape[-1]
    n_groups = -(-V // group_size)
    full = V // n_groups * n_groups  # the tokens of the (V // G, G) view
    out = reduce(probs[..., :full].unflatten(-1, (-1, n_groups)), -2)
    out[..., :V - full] = combine(out[..., :V - full], probs[..., full:])
    return out


def group_members(groups, V, group_size=16):
    """Group numbers (...) -> the ids of their tokens (..., V // G + 1); an id >= V is none."""
    n_groups = -(-V // group_size)
    return groups.unsqueeze(-1) + n_groups * torch.arange(V // n_groups + 1, device=groups.device)


def top_k(probs, k, group_size=16):
    """torch.topk(probs, k) as (values, ids), exact, and a few times faster on CPU for k << V: the k
    largest values lie in the k groups with the largest maxima (a token outside them is beaten by each
    of those k maxima), so only their members are sorted. (Equal values may come out reordered.)"""
    V = probs.shape[-1]
    if k * group_size > V // 4:  # few groups: the candidates would cost more than a plain topk
        top = probs.topk(k, dim=-1)
        return top.values, top.indices
    groups = group_reduce(probs, 'max', group_size).topk(k, dim=-1).indices  # (..., k)
    cols = group_members(groups, V, group_size).flatten(-2)
    vals = probs.gather(-1, cols.clamp(max=V - 1)).masked_fill_(cols >= V, float('-inf'))
    top = vals.topk(k, dim=-1)
    return top.values, cols.gather(-1, top.indices)


# -----------------------------------------------------------------------------
# progress, stopping and user errors


def progress_printer(what, unit, start, total, every=5.0):
    """progress(done) prints 'what done/total unit, tok/s, ETA' at most every `every` seconds, and at
    the end; done and total count tokens (positions)."""
    t0, last = time.time(), [0.0]

    def progress(done):
        now = time.time()
        if now - last[0] > every or done == total:
            last[0] = now
            tok_s = (done - start) / (now - t0)
            print(f"{what} {done:,}/{total:,} {unit}  {tok_s:,.0f} tok/s  "
                  f"ETA {(total - done) / max(tok_s, 1e-9):.0f}s", flush=True)
    return progress


@contextmanager
def stop_requested():
    """Yields a list that Ctrl-C or SIGTERM appends to: the loop finishes its step, saves and exits. The
    first signal restores the previous handler, so a second one stops at once."""
    stop = []
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

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


def stop_everywhere(stop, env):
    """The signal that asked some rank to stop, or 0: under DDP every
    rank stops at the same step, with the same exit status."""
    sig = stop[0] if stop else 0
    if env.ddp:
        flag = torch.tensor(sig, device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        sig = int(flag.item())
    return sig


def output_folder(cfg, env):
    """The folder this rank writes (None: none): out_dir, or cache_dir
    in cache and verify modes (verify only reads: read-only is fine)."""
    folder = cfg.cache_dir if cfg.mode in ('cache', 'verify') else cfg.out_dir
    if env.master and (cfg.mode != 'verify' or os.access(folder, os.W_OK)):
        return folder


@contextmanager
def folder_lock(folder, ckpt=None):
    """One writer per folder (None: this rank writes none): an flock on
    FOLDER/.lock, held for the run. The OS drops it when its holder
    dies, so a killed run never blocks the next; the file keeps the
    holder's pid. A folder that this run made and left empty goes."""
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
            die(f"{folder} is in use by another rskd run (process "
                f"{f.read().strip() or '?'}): wait for it to finish, or use another folder")
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        if ckpt and os.stat(ckpt['path']).st_mtime_ns != ckpt['loaded_mtime']:
            die(f"{ckpt['path']} was saved by another run while this one "
                f"started: run the command again")
        try:
            yield
        finally:
            f.truncate(0)
            if new and os.listdir(folder) == ['.lock']:
                os.remove(lock)
                os.rmdir(folder)


class Interrupted(Exception):
    """A signal reached the run: args (signal number[, what was saved])."""


def interrupt(sig, frame):
    INTERRUPTS.append(sig)
    raise Interrupted(sig)


@contextmanager
def entry_point():
    """Every entry point's error boundary. A user's mistake, a failing
    disk or a signal ends in one line and an exit status that tells the
    truth (1; 130 after Ctrl-C, 143 after SIGTERM), never a traceback.
    Temp files go where they are made (replaced); work saved stays."""
    INTERRUPTS.clear()
    handlers = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except SystemExit:
        raise
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            INTERRUPTS.append(signal.SIGINT)
        if INTERRUPTS or isinstance(e, Interrupted):
            sig = e.args[0] if isinstance(e, Interrupted) else INTERRUPTS[0]
            saved = e.args[1] if isinstance(e, Interrupted) and len(e.args) > 1 else (
                "work is kept up to the last save: rerun the same command to go on")
            if os.environ.get('RANK', '0') == '0':
                print(f"interrupted ({signal.Signals(sig).name}): {saved}", file=sys.stderr)
            sys.exit(128 + sig)
        if not isinstance(e, OSError):
            raise
        path = e.filename2 or e.filename  # (a rename's destination is filename2)
        if isinstance(e, (IsADirectoryError, NotADirectoryError)):
            what = 'a folder where rskd needs a file' if os.path.isdir(path) else 'not a folder'
            die(f"{path} is {what}: move it away or pass another path")
        die(f"{e.strerror or e}{': ' + str(path) if path else ''}: fix that and "
            f"rerun the same command; work saved before is intact")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


INTERRUPTS = []  # signals received: whatever fails after one is part of the stop


@contextmanager
def ddp_teardown(env):
    """Under DDP, free DDP (and the gloo work it holds) while Python is fully alive, then end the
    process group: left to interpreter shutdown, a gloo worker can abort a finished run. A finished
    run first waits for every rank (rank 0 may still be saving), so none takes the group down early."""
    try:
        yield
        if env.ddp:
            dist.barrier()
    finally:
        if env.ddp:
            gc.collect()
            dist.destroy_process_group()

