"""
The guard rails of rskd.py: everything that keeps a run from losing work, training on the wrong files or
ending in a traceback, and that a reader of the method need not see.

- the command line, generated from rskd.Config's fields, and the checks of its values
- the run's environment: torchrun's ranks, the device, the dtype, autocast
- the resume-config merge (a resumed run keeps what would change its data order or model)
- data and cache validation: meta.json schemas, file sizes, fingerprints of the data and the teacher
- atomic writes, checkpoint and teacher loading (weights only: a file cannot run code)
- the cache's files on disk: creation, resume truncation, commits
- the stop flag for Ctrl-C/SIGTERM, and one-line messages for the errors a user can cause

Every function that finds a problem the user can fix calls die(): one line that says what to do, exit 1.
"""
import argparse
import errno
import gc
import hashlib
import importlib.util
import json
import math
import os
import re
import signal
import sys
import time
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
    p = OneLineParser(description=description)
    for f in fields(config_cls):
        extra = f" [teacher: {teacher_defaults[f.name]}]" if f.name in teacher_defaults else ""
        flag = dict(nargs='?', const=True) if f.type is bool else {}  # --resume = --resume true
        choices = f.metadata.get('choices')
        listed = f" ({' | '.join(choices)})" if choices else ""
        p.add_argument(f'--{f.name}', type=boolean if f.type is bool else f.type, default=None, **flag,
                       choices=choices, metavar=f.type.__name__.upper(),
                       help=f"{f.metadata['help']}{listed} (default: {f.default}){extra}")
    return {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}


def resolve_config(config_cls, args, teacher_defaults, formats):
    """Config from the defaults (the teacher's in --mode teacher), a resumed run's saved config and the
    command line, in that order. Returns (cfg, the checkpoint to resume or None)."""
    mode = args.get('mode', config_cls.mode)
    base = dict(teacher_defaults) if mode == 'teacher' else {}
    ckpt = None
    if mode in ('teacher', 'train'):
        ckpt_path = os.path.join(args.get('out_dir', base.get('out_dir', config_cls.out_dir)), 'ckpt.pt')
        if args.get('resume'):  # the saved run's config, then whatever this command line changes
            ckpt = load_checkpoint(ckpt_path)
            base.update({k: v for k, v in ckpt['config'].items() if k in config_cls.__dataclass_fields__})
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
    cfg = config_cls(**{**base, **args})
    if cfg.method == 'rs' and cfg.proposal_temperature != 1:  # RS from a tempered proposal: an is cache
        cfg = replace(cfg, method='is')
    if cfg.method not in formats:  # the cache methods are FORMATS's entries
        die(f"argument --method: invalid choice: {cfg.method!r} (choose from {', '.join(formats)}) (see --help)")
    check_config(cfg)
    return cfg, ckpt


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
    if not (0 < cfg.proposal_temperature < math.inf):
        die(f"--proposal_temperature must be a positive number, got {cfg.proposal_temperature}")
    if cfg.proposal_temperature != 1 and cfg.method != 'is':
        die(f"--proposal_temperature applies to --method rs or is, not --method {cfg.method}")
    if cfg.mode == 'train' and cfg.topk_tail != 'none' and cfg.loss != 'topk':
        die(f"--topk_tail {cfg.topk_tail} changes only --loss topk, not --loss {cfg.loss}: drop it or use --loss topk")
    if not re.fullmatch(r'auto|cpu|cuda(:\d+)?', cfg.device):
        die(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device}")
    if cfg.device.startswith('cuda') and 'RANK' not in os.environ:
        gpus = torch.cuda.device_count()
        if gpus <= int(cfg.device[5:] or 0):
            die(f"--device {cfg.device}, but this PyTorch sees {gpus} CUDA GPUs: use --device cpu")


def resolve_dtype(dtype, device_type):
    """--dtype auto: float32 on CPU; on a GPU bfloat16 where it has it, else float16 (with a scaler)."""
    if dtype != 'auto':
        return dtype
    if device_type != 'cuda':
        return 'float32'
    return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'


def check_cache_options(cfg, V):
    if cfg.method == 'topk' and cfg.k > V:
        die(f"--k must be at most the vocabulary size {V}, got {cfg.k}")


def setup(cfg):
    """The run's environment, one namespace: distributed (under torchrun) or not, rank and world
    size, the device, --dtype resolved, the autocast context and whether to compile."""
    env = SimpleNamespace(ddp='RANK' in os.environ, rank=0, world=1, device=cfg.device)
    if env.ddp:
        use_cuda = torch.cuda.is_available() and cfg.device != 'cpu'
        dist.init_process_group('nccl' if use_cuda else 'gloo')
        env.rank, env.world = dist.get_rank(), dist.get_world_size()
        env.device = f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else 'cpu'
        if use_cuda:
            torch.cuda.set_device(env.device)
    elif cfg.device == 'auto':  # (not mps: it has no float64, which sampling and metrics use)
        env.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    env.master, env.type = env.rank == 0, env.device.split(':')[0]
    env.name = torch.cuda.get_device_name() if env.type == 'cuda' else env.device
    if env.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env.dtype = resolve_dtype(cfg.dtype, env.type)
    # autocast runs the matmuls in 16 bits; losses, softmaxes and metrics cast to float32 themselves
    half = env.dtype != 'float32'
    env.ctx = torch.autocast(env.type, dtype=getattr(torch, env.dtype)) if half else nullcontext()
    env.compile = cfg.compile == 'true' or (cfg.compile == 'auto' and env.type == 'cuda')
    return env


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


DATA_META = dict(tokenizer=str, vocab_size=int, eot=int, dtype=str, train_tokens=int, val_tokens=int,
                 train_docs=int, val_docs=int, val_fraction=(int, float), source=list)


def on_master(fn, env):
    """fn() on rank 0, its result broadcast to every rank: one pass over a big file, not one per rank."""
    out = [fn() if env.master else None]
    if env.ddp:
        dist.broadcast_object_list(out, src=0)
    return out[0]


def gather_on_master(obj, env):
    """Every rank's obj, in rank order, on rank 0 (None elsewhere); [obj] without DDP."""
    if not env.ddp:
        return [obj]
    gathered = [None] * env.world if env.master else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def check_data(data_dir, split, T, max_seqs, env):
    """DATA_DIR/split.bin's path, the number of its tokens to use and the vocabulary size, after checking
    meta.json, the file's size, that it holds at least one block, and that every token is below V."""
    meta = read_json(os.path.join(data_dir, 'meta.json'), DATA_META, "run prepare_data.py first")
    path, V = os.path.join(data_dir, f'{split}.bin'), meta['vocab_size']
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

    def largest():  # a chunked scan, never the whole file in RAM
        return max(int(tokens[i:i + (1 << 26)].max()) for i in range(0, n, 1 << 26))
    if on_master(largest, env) >= V:
        die(f"{path} holds token ids >= vocab_size {V}: it was not made with this tokenizer")
    return path, n, V


def data_fingerprint(tokens, path, env):
    """{path, n_tokens, sha256 of the tokens used}: a cache records it, training compares it."""
    def sha256():
        h = hashlib.sha256()
        for i in range(0, len(tokens), 1 << 26):
            h.update(tokens[i:i + (1 << 26)].tobytes())
        return h.hexdigest()
    return dict(path=os.path.abspath(path), n_tokens=len(tokens), sha256=on_master(sha256, env))

# -----------------------------------------------------------------------------
# atomic writes, checkpoints and teachers


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
    data = json.dumps(d, indent=1).encode()

    def write(f):
        f.write(data)
    save_atomic(write, path)


def save_checkpoint(path, model, optimizer, scaler, it, best_val_loss, config):
    """Everything an exact resume needs, atomically: the plain model (no compile/DDP prefixes), the
    optimizer's moments, the scaler, the RNG, the step and the config."""
    state = dict(model=model.state_dict(), model_config=asdict(model.config),
                 optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=torch.get_rng_state(),
                 iter_num=it, seqs_seen=it * config['batch_size'] * config['gradient_accumulation_steps'],
                 best_val_loss=best_val_loss, config=config)

    def write(f):
        torch.save(state, f)
    save_atomic(write, path)


def restore(ckpt, model, optimizer, scaler):
    """Load a checkpoint's state into a new run; returns (iteration, best val loss)."""
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    torch.set_rng_state(ckpt['rng'])
    return ckpt['iter_num'], ckpt['best_val_loss']


def start_metrics(metrics_path, ckpt):
    """OUT_DIR and, for a new run, an empty metrics.jsonl (a resumed run appends to its own)."""
    os.makedirs(os.path.dirname(metrics_path) or '.', exist_ok=True)
    if not ckpt:
        open(metrics_path, 'w').close()


def log_eval(metrics_path, record):
    """Append one eval's JSON line to metrics.jsonl (after its checkpoint is saved) and print it."""
    with open(metrics_path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    shown = ('val_loss', 'val_ppl', 'ece', 'kl_teacher', 'spec_accept')
    print(f"eval {record['iter']}: " + ', '.join(f"{k} {record[k]:.4f}" for k in shown if k in record))


def check_val_loss(val_loss, it, ckpt_path):
    if not math.isfinite(val_loss):
        die(f"the val loss is {val_loss} at iter {it}: not saved, {ckpt_path} holds the last good state")


def check_step(loss, grad_norm, scaled, it, ckpt_path):
    """Stop before an update from a non-finite loss or gradient (fp16's GradScaler skips overflowed
    steps by itself, so with it only the loss counts); the last checkpoint is the last good state."""
    if not math.isfinite(loss) or (not scaled and not math.isfinite(grad_norm)):
        die(f"the loss became {loss} (gradient norm {grad_norm}) at iter {it}; stopped before the update, "
            f"{ckpt_path} holds the last good state. Lower --learning_rate or check the data and cache")


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


def find_teacher(cfg, required, cache_meta, vocab_size, env):
    """The cache's own teacher if it still exists, else --teacher (none in --mode teacher), or None
    with a note when the run needs it only for metrics. A cache's teacher must be the one it was made
    from."""
    names = [cfg.teacher] if cfg.mode == 'train' else []
    if cache_meta:
        names = [cache_meta['teacher']['name'], cfg.teacher]
    cache_dir, block_size = cfg.cache_dir, cfg.block_size
    hf_ok = importlib.util.find_spec('transformers') is not None
    found = [n for n in names if (n in HF_TEACHERS and hf_ok) or os.path.exists(n)]
    if not found and not required:
        if names and env.master:
            print(f"note: teacher {names[-1]} not found, so no kl_teacher/spec_accept metrics")
        return None
    teacher, info = load_teacher((found or names)[0], vocab_size, block_size, env)
    if cache_meta and info['sha256'] != cache_meta['teacher']['sha256']:
        die(f"teacher {info['name']} is not the one {cache_dir} was made from: pass that one with --teacher")
    return teacher

# -----------------------------------------------------------------------------
# the cache on disk: meta.json and the files that rskd.FORMATS describes (sizes from rskd.file_sizes)


CACHE_META = dict(format=str, version=int, method=str, vocab_size=int, block_size=int, num_seqs=int, seed=int,
                  split=str, teacher=dict(name=str, sha256=str), data=dict(path=str, n_tokens=int, sha256=str),
                  ids_dtype=str, dtype=str, device=str, complete=bool, seqs_done=int, entries=int)
PROGRESS = ('complete', 'seqs_done', 'entries')
# value checks of the methods' own meta fields (a field without one needs only the right type)
VALID_VALUES = dict(rounds=lambda r: 1 <= r <= 255, sampler=lambda s: s in ('multinomial', 'systematic'),
                    k=lambda k: k >= 1, proposal_temperature=lambda tau: 0 < tau < math.inf)


def file_sizes(meta, formats):
    """Each file's numpy dtype and number of elements once meta['seqs_done'] sequences are written:
    formats[method]['files'] gives name -> (dtype, what the file has one element per)."""
    P = meta['seqs_done'] * meta['block_size']
    count = {'position': P, 'k per position': P * meta.get('k', 0), 'entry': meta['entries'],
             'sequence': meta['seqs_done'] + 1}
    files = formats[meta['method']]['files']
    return {name: (meta['ids_dtype'] if dtype == 'ids' else dtype, count[unit]) for name, (dtype, unit) in files.items()}


def read_cache_meta(cache_dir, formats):
    """CACHE_DIR/meta.json, checked against the common schema and its method's own fields."""
    path = os.path.join(cache_dir, 'meta.json')
    if not os.path.exists(path):
        die(f"no cache in {cache_dir}: make one with --mode cache --cache_dir {cache_dir}")
    with open(path) as f:
        try:
            method = json.load(f).get('method')
        except (ValueError, AttributeError):
            die(f"{path} is not valid JSON: delete {cache_dir} and rerun --mode cache")
    if method not in formats:
        die(f"{path} has method {method!r}, not {' or '.join(formats)}: delete {cache_dir} and rerun --mode cache")
    meta = read_json(path, {**CACHE_META, **formats[method]['meta']}, "rerun --mode cache")
    valid = (meta['format'] == 'rskd-cache' and meta['version'] == 1 and meta['ids_dtype'] in ('uint16', 'int32')
             and 0 <= meta['seqs_done'] <= meta['num_seqs'])
    valid = valid and meta['complete'] == (meta['seqs_done'] == meta['num_seqs'])
    for k in formats[method]['meta']:
        if k in VALID_VALUES and not VALID_VALUES[k](meta[k]):
            valid = False
    if not valid:
        die(f"{path} holds values that rskd never writes: delete {cache_dir} and make the cache again")
    return meta


def cache_memmaps(cache_dir, sizes):
    """The cache's files (sizes: name -> (dtype, elements)), memory-mapped, after checking each one's size."""
    mm = {}
    for name, (dt, n) in sizes.items():
        path = os.path.join(cache_dir, f'{name}.bin')
        if not os.path.exists(path) or os.path.getsize(path) != n * np.dtype(dt).itemsize:
            die(f"{path} does not have the size {cache_dir}/meta.json gives: the cache is damaged; delete it "
                f"and make it again with --mode cache")
        mm[name] = np.memmap(path, dtype=dt, mode='r', shape=(n,))
    return mm


def resume_cache(cache_dir, meta, formats, env):
    """The progress saved in CACHE_DIR/meta.json when it holds the same cache, else the new meta. A
    cache made differently (teacher, data, method, options) is refused; a complete one is checked."""
    if not os.path.exists(os.path.join(cache_dir, 'meta.json')):  # every rank checks, all stop together
        return meta
    old = read_cache_meta(cache_dir, formats)
    for key in meta:
        a, b = old.get(key), meta[key]
        if key not in PROGRESS and (a.get('sha256') != b['sha256'] if key in ('teacher', 'data') else a != b):
            die(f"{cache_dir} holds a cache made with a different {key} ({a} vs now {b}): use another "
                f"--cache_dir, or delete it to start over")
    if old['complete']:
        cache_memmaps(cache_dir, file_sizes(old, formats))  # its files are whole
        if env.master:
            print(f"{cache_dir} is complete ({old['num_seqs']} sequences): nothing to do")
    return old


def open_cache_files(cache_dir, meta, formats, env):
    """Rank 0's append handles, name -> (file, dtype). A new cache's files hold what file_sizes gives
    for no sequences: nothing, or seq_offsets' leading 0. On resume the files are cut back to what
    meta.json has committed, and a chunk written after the last commit is redone."""
    sizes = file_sizes(meta, formats)
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
                die(f"{path} is shorter than {meta_path} says: the cache is damaged; delete {cache_dir}")
        if meta['seqs_done']:
            print(f"resuming {cache_dir} at sequence {meta['seqs_done']}/{meta['num_seqs']}")
        else:
            write_json(meta, meta_path)
    if env.ddp:
        dist.barrier()
    # unbuffered: a failed commit leaves no bytes in Python's buffers, to land later behind a resume
    return {name: (open(path, 'ab', buffering=0), dt) for name, (path, dt, n) in files.items()} if env.master else {}


def commit_chunk(handles, parts, meta, seqs_done, cache_dir):
    """Append the parts (one per rank, in sequence order; None for a rank without sequences) to their
    files, make them durable, then record seqs_done in meta.json: meta.json never runs ahead."""
    arrays = {name: [] for name in handles}
    for part in filter(None, parts):
        if 'seq_offsets' in handles:  # a ragged format: where each sequence's entries end
            per_seq = part['lengths'].reshape(-1, meta['block_size']).sum(1, dtype=np.uint64)
            part['seq_offsets'] = meta['entries'] + np.cumsum(per_seq, dtype=np.uint64)
        for name in handles:
            arrays[name].append(part[name])
        meta['entries'] += len(part['ids'])
    try:
        for name, (f, dt) in handles.items():
            for a in arrays[name]:
                data = memoryview(a.astype(dt).tobytes())
                while data:  # an unbuffered write may take only part
                    data = data[f.write(data):]
        for f, _ in handles.values():
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        die(f"writing {cache_dir} failed ({e.strerror}); it is intact up to sequence {meta['seqs_done']}: "
            f"free space and rerun the same command to resume")
    meta['seqs_done'] = seqs_done
    meta['complete'] = seqs_done == meta['num_seqs']
    write_json(meta, os.path.join(cache_dir, 'meta.json'))


def close_cache(handles, meta, cache_dir, tok_s):
    for f, _ in handles.values():
        f.close()
    P = meta['num_seqs'] * meta['block_size']
    size = sum(os.path.getsize(os.path.join(cache_dir, f'{name}.bin')) for name in handles)
    unique = f"{meta['entries'] / P:.2f} unique tokens/position, " if 'lengths' in handles else ""
    print(f"cache complete: {cache_dir}, {P:,} positions, {unique}{size / P:.2f} bytes/position, "
          f"{size / 1e6:.1f} MB, {tok_s:,.0f} tok/s")


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
    """True when any rank was asked to stop: under DDP every rank must stop at the same step."""
    if env.ddp:
        flag = torch.tensor(float(bool(stop)), device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
    return bool(stop)


@contextmanager
def ddp_teardown(env):
    """Under DDP, free DDP (and the gloo work it holds) while Python is fully alive, then end the
    process group: left to interpreter shutdown, a gloo worker can abort a finished run."""
    try:
        yield
    finally:
        if env.ddp:
            gc.collect()
            dist.destroy_process_group()


@contextmanager
def user_errors(cfg):
    """Ctrl-C outside training's own handler, a full disk, a folder we may not write: one line each."""
    try:
        yield
    except KeyboardInterrupt:
        die("interrupted" + (": rerun the same command to resume the cache" if cfg.mode == 'cache' else ""))
    except OSError as e:  # anywhere not handled more precisely
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        die(f"{e.strerror}: {e.filename or 'writing ' + (cfg.cache_dir if cfg.mode == 'cache' else cfg.out_dir)}; "
            f"fix that and rerun the same command (finished work is kept)")
