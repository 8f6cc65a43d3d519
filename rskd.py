"""
rskd: Random Sampling Knowledge Distillation ("Sparse Logit
Sampling", Anshumann et al., ACL 2025). One teacher pass fills a
cache: N draws from its distribution t at each position, as ids and
counts, an unbiased estimate of t. The student learns from it.

  python prepare_data.py                    # text -> data/
  python rskd.py --mode teacher             # -> out-teacher/
  python rskd.py --mode cache               # -> cache-rs/
  python rskd.py --mode train --loss rskd   # -> out/
  python rskd.py --mode verify              # check a cache
  python rskd.py --mode export              # out/ -> out/hf
  torchrun --standalone --nproc_per_node=8 rskd.py --mode cache
"""
import functools
import math
import os
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

# guardrails.py: what a reader need not open (checks, loading, cache
# files, locks, errors). Imported before torch, which is slow to load:
# its signal handler makes a Ctrl-C meanwhile one line, not a traceback
import guardrails as gr
from guardrails import opt  # a Config field: default, help, choices
# FORMATS' value checks: in_vocab (0 <= id < V), at_least_1, positive,
# probability (in [0, 1]), ascending (strictly) and descending (never
# rising) within a position, sums_to(o): a position sums to meta[o]
from guardrails import (ascending, at_least_1, descending, in_vocab,
                        positive, probability, sums_to)
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

# model.py: nanoGPT's GPT, but model(idx) -> (B, T, V) logits at all
# T (padded=True: see cache_batch); fast kernels: group_reduce(x, op)
# sums (or maxes) x's last dim in ~V/16 groups, (..., V) -> (..., ~V/16);
# invert_cdf(p, points): the token at each point of p's CDF
from model import export_hf, group_reduce, invert_cdf, top_k

# ---------------------------------------------------------------
# config: opt(default, --help text, choices) makes a dataclass field

@dataclass
class Config:
    mode: str = opt('train', "run", ('teacher', 'cache', 'train', 'verify', 'export'))
    data_dir: str = opt('data', "tokens from prepare_data.py")
    out_dir: str = opt('out', "checkpoint and metrics.jsonl")
    cache_dir: str = opt('cache-rs', "cache writes it, train reads it")
    teacher: str = opt('out-teacher/ckpt.pt', "a ckpt.pt, gpt2* or HF folder")
    resume: bool = opt(False, "continue from out_dir/ckpt.pt")
    init_from: str = opt('scratch', "student: scratch, gpt2*, HF folder, ckpt")
    max_seqs: int = opt(0, "use the first N sequences (0: all); not val's in train")
    # the student's shape (a teacher's, and its other defaults: TEACHER)
    n_layer: int = opt(2, "transformer blocks")
    n_head: int = opt(4, "attention heads")
    n_embd: int = opt(128, "embedding width")
    block_size: int = opt(128, "sequence length T")
    # optimisation
    batch_size: int = opt(16, "sequences per micro-batch, per rank")
    gradient_accumulation_steps: int = opt(
        0, "micro-batches per step, all ranks (0: one per rank)")
    max_iters: int = opt(200, "optimizer steps")
    lr_decay_iters: int = opt(0, "step where the cosine ends (0: max_iters)")
    learning_rate: float = opt(3e-3, "peak learning rate")
    min_lr: float = opt(3e-4, "learning rate at the end")
    warmup_iters: int = opt(20, "linear warmup steps")
    weight_decay: float = opt(0.1, "AdamW weight decay, matrices only")
    grad_clip: float = opt(1.0, "gradient norm clip (0: off)")
    eval_interval: int = opt(100, "eval and save every N steps")
    eval_iters: int = opt(10, "val batches per eval")
    log_interval: int = opt(10, "print every N steps")
    # the student's objective: --loss (or --topk_tail) picks OBJECTIVES'
    loss: str = opt('rskd', "the objective", ('rskd', 'topk', 'fullkd', 'ce'))
    topk_tail: str = opt('none', "Top-K's remedy", ('none', 'ghost', 'smooth', 'naive'))
    alpha: float = opt(0.0, "weight of an added label CE")
    # what --mode cache stores: a key of FORMATS below
    method: str = opt('rs', "the sparse target to cache")
    sampler: str = opt('multinomial', "how rs/is draw", ('multinomial', 'systematic'))
    rounds: int = opt(50, "rs and is: draws per position, 1..255")
    proposal_temperature: float = opt(1.0, "is: draws from q ∝ t^tau")
    k: int = opt(12, "topk: ids per position")
    split: str = opt('train', "what to cache", ('train', 'val'))
    commit_seconds: float = opt(5.0, "cache: fsync at most this often")
    compress: bool = opt(True, "cache: deflate each sequence")
    device: str = opt('auto', "auto | cpu | cuda | cuda:N")
    dtype: str = opt('auto', "auto: float32 on CPU, bfloat16 or float16 on GPU",
                     ('auto', 'float32', 'bfloat16', 'float16'))
    compile: str = opt('auto', "auto: on CUDA", ('auto', 'true', 'false'))
    seed: int = opt(1337, "model init, data order, sampling")

TEACHER = dict(out_dir='out-teacher', n_layer=4, n_embd=256, max_iters=250,
               eval_interval=125, learning_rate=2e-3, min_lr=2e-4)

# env = gr.setup(cfg), in main: ddp (run by torchrun), rank and world
# (this process's number and the count: 0 and 1 without torchrun),
# master (rank 0, which prints and saves), device ('cpu', 'cuda:N'),
# device_type ('cpu', 'cuda'), dtype, ctx (its autocast), compile

# ---------------------------------------------------------------
# data: uint16 tokens, memory-mapped; sequence s is tokens[s*T : s*T+T+1]

def load_split(cfg, split, env, max_seqs=0):
    # (tokens, S, V): the first max_seqs sequences (0: all), checked
    path, n, V = gr.check_data(cfg.data_dir, split, cfg.block_size, max_seqs, env)
    tokens = np.memmap(path, np.uint16, mode='r', shape=(n,))
    return tokens, (n - 1) // cfg.block_size, V

def get_batch(tokens, seqs, T, env, rows=0):
    # x = tokens[s*T : s*T+T], y: x shifted by one. x, not y, is padded
    # to `rows` rows with its last sequence (one shape for a compiled model)
    padded = list(seqs) + [seqs[-1]] * max(rows - len(seqs), 0)
    first = np.array(padded, dtype=np.int64)[:, None] * T  # (B, 1)
    xy = torch.from_numpy(tokens[first + np.arange(T + 1)].astype(np.int64))
    if env.device_type == 'cuda':  # pinned: the copy overlaps the GPU's work
        xy = xy.pin_memory().to(env.device, non_blocking=True)
    return xy[:, :-1], xy[:len(seqs), 1:]

def by_rows(x):
    # (B, T, ...) -> (rows, ...) chunks: temporaries, a few rows at a time
    rows = 128 if x.device.type == 'cpu' else 4096
    return x.flatten(0, 1).split(rows)

# every random stream is keyed by (seed, purpose, index), hashed by
# numpy's SeedSequence: seeds give unrelated orders and draws
INIT, ORDER, SAMPLING = 0, 1, 2

def stream_seed(seed, purpose, index=0):
    key = np.random.SeedSequence([seed, purpose, index])
    return int(key.generate_state(1, np.uint64)[0])

@functools.lru_cache(maxsize=2)  # a batch may span two epochs
def epoch_permutation(S, seed, epoch):
    gen = torch.Generator().manual_seed(stream_seed(seed, ORDER, epoch))
    return torch.randperm(S, generator=gen).numpy()

def draw_seqs(S, seed, start, count):
    # draws start .. start+count-1 of endless epochs, each a permutation
    # of the S sequences: a draw depends on its number alone (resume)
    return [int(epoch_permutation(S, seed, i // S)[i % S])
            for i in range(start, start + count)]

# ---------------------------------------------------------------
# the method, part 1: N draws from the teacher's t, and their counts

def sample_draws(probs, rounds, gens, sampler='multinomial'):
    # probs (B, T, V) -> N = rounds draws (B, T, N), sorted, from each
    # row (it need not sum to 1); gens: a random generator per sequence.
    # Token i owns a width p_i of the row's CDF: a point x in (0, 1]
    # draws the token whose interval holds x * sum(p), so token i with
    # probability t_i = p_i / sum(p). multinomial: N points 1 - u, u
    # uniform. systematic: ONE uniform u per row, points (j - u) / N,
    # j = 1..N: E[c_i] = N t_i still, but c_i is N t_i rounded up or down
    B, T, V = probs.shape
    n_u = rounds if sampler == 'multinomial' else 1  # uniforms a row
    f64 = dict(dtype=torch.float64, device=probs.device)
    u = torch.stack([torch.rand(T, n_u, generator=g, **f64)
                     for g in gens])  # (B, T, N or 1), uniform in [0, 1)
    if sampler == 'multinomial':
        points = 1 - u  # (B, T, N), in (0, 1]
    else:  # j = 1..N
        points = (torch.arange(1, rounds + 1, **f64) - u) / rounds
    # points -> token ids (invert_cdf, in model.py), a few rows at a
    # time: exact to float32 rounding, never a token of probability 0
    rows = zip(by_rows(probs), by_rows(points))
    draws = torch.cat([invert_cdf(p, x) for p, x in rows])
    return draws.view(B, T, rounds).sort(-1).values

def run_lengths(draws):
    # sorted draws (..., N) -> lengths, ids, counts. E.g. the rows
    # [3 3 7] and [1 1 1] give lengths [2 1] (distinct ids per row),
    # ids [3 7 1] and counts [2 1 3]: each row's ids, row after row
    new = torch.ones_like(draws, dtype=torch.bool)  # starts a run
    # (a row's first draw starts one: no run spans two rows)
    new[..., 1:] = draws[..., 1:] != draws[..., :-1]
    starts = new.flatten().nonzero().squeeze(1)  # (one host sync)
    end = torch.full((1,), draws.numel(), device=draws.device)
    counts = torch.diff(starts, append=end)  # each run's length
    return new.sum(-1), draws.flatten()[starts], counts

# ---------------------------------------------------------------
# the method, part 2: sparse targets, t (B, T, V) in, a few ids a
# position out, {file name: tensor}. opts.x: cfg.x, for each option x
# that the target's FORMATS entry (below) lists; gens: as above

def rs_target(probs, opts, gens):
    # RS-KD: at each position draw N = --rounds tokens from t, with
    # replacement, and store each distinct id once with its count c_i.
    # t^s_i = c_i / N is UNBIASED, E[c_i] = N t_i, so the student's
    # gradient p - t^s (per position) is full KD's p - t in expectation
    draws = sample_draws(probs, opts.rounds, gens, opts.sampler)  # (B, T, N)
    lengths, ids, counts = run_lengths(draws)
    # lengths (B, T): ids per position; ids, counts (E,): the entries
    # of every position in turn, E = lengths.sum()
    return dict(lengths=lengths, ids=ids, counts=counts)

def is_target(probs, opts, gens):
    # importance sampling, the paper's second variant: draw from q ∝ t^tau
    # (tau: --proposal_temperature), weight t_i / q_i. E[c_i / N] = q_i, so
    # (c_i/N)(t_i/q_i) is unbiased too, unless a t_i > 0 underflows to
    # t_i^tau = 0, which 0 < tau <= 1 never does
    proposal = probs.pow(opts.proposal_temperature)  # (B, T, V)
    target = rs_target(proposal, opts, gens)  # (rows need not sum to 1)
    lengths, ids = target['lengths'].flatten(), target['ids']
    # row[e]: the position (a row of B*T) that entry e belongs to
    positions = torch.arange(len(lengths), device=ids.device)
    row = positions.repeat_interleave(lengths, output_size=len(ids))
    # q_i = proposal_i / its row's total, the group sums (model.py) added
    # in float64 as in the sampler: no float64 copy of (B, T, V)
    total = group_reduce(proposal, 'sum').sum(-1, dtype=torch.float64)
    q = proposal.flatten(0, 1)[row, ids] / total.flatten()[row]
    t = probs.flatten(0, 1)[row, ids]
    target['weights'] = (t / q).float()
    return target

def topk_target(probs, opts, gens):
    # the baseline: the K most probable ids and probabilities, (B*T, K),
    # NOT renormalised (vanilla Top-K). top_k: torch.topk, faster on CPU
    top = [top_k(p, opts.k) for p in by_rows(probs)]  # (values, ids)
    values, ids = map(torch.cat, zip(*top))  # (B*T, K), most probable first
    return dict(ids=ids, probs=values.half())

# ---------------------------------------------------------------
# the method, part 3: the losses, (B, T, V) logits in, a float32
# scalar out. A target is read at its ids (B, T, K), never made dense
# (K: Top-K's k, or a batch's most ids at a position; pad_rows pads)

def pad_rows(lengths, ids, values):
    # ragged rows -> (R, K) ids and values, padded with id 0, value 0:
    # the first lengths[r] slots of each row r, in order, are the entries
    K = int(lengths.max())
    real = torch.arange(K, device=ids.device) < lengths.reshape(-1, 1)  # (R, K)
    out_ids = torch.zeros(real.shape, dtype=torch.long, device=ids.device)
    out_values = torch.zeros(real.shape, device=ids.device)
    out_ids[real], out_values[real] = ids.long(), values.float()
    return out_ids, out_values

def sparse_kd_loss(logits, ids, w):
    # KL(t^s || p) = sum_i w_i (log w_i - log p_i) over the stored ids,
    # w the cache's weights (t^s), p the student's softmax over the FULL
    # vocabulary; then the mean over positions. Per position its gradient
    # w.r.t. the logits is (sum_i w_i) p - w:
    # - RS-KD: sum w = 1, so p - w, unbiased for full KD's p - t
    # - importance weights: (sum w) p - w, still p - t on average
    # - Top-K: w = the top K t_i, so (sum_K t) p - t_K: biased.
    # With sum w != 1 it is no KL, and can be < 0
    logp = F.log_softmax(logits.float(), -1).gather(-1, ids)  # (B, T, K)
    return (torch.xlogy(w, w) - w * logp).sum(-1).mean()

def full_kd_loss(logits, teacher_logits):
    # KL(t || p) over the whole vocabulary, the upper bound: by rows,
    # each recomputed in the backward, so no (B, T, V) temporaries stay
    def kl(x, xt):
        logt = F.log_softmax(xt.float(), dim=-1)
        return (logt.exp() * (logt - F.log_softmax(x.float(), dim=-1))).sum()
    rows = zip(by_rows(logits), by_rows(teacher_logits))
    total = sum(checkpoint(kl, x, xt, use_reentrant=False) for x, xt in rows)
    return total / logits.shape[:2].numel()

def ce_loss(logits, targets):
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

# Top-K's remedies, the paper's baselines (skip at first): each gives
# the mass Top-K drops, 1 - T_K (T_K = sum_K t), to something else

def ghost_kd_loss(logits, ids, t):
    # one extra "ghost" bucket holds the rest of the mass; P_K = sum_K p:
    # L = sum_K t_i log(t_i / p_i) + (1 - T_K) log((1 - T_K) / (1 - P_K))
    logp_all = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    logp = logp_all.gather(-1, ids)
    # log(1 - P_K): a logsumexp of the tail's own log p, exact for a tiny
    # tail; the K ids get the lowest float, not -inf (K = V stays finite)
    tail_logp = logp_all.scatter(-1, ids, torch.finfo(torch.float32).min)
    log_tail_p = torch.logsumexp(tail_logp, dim=-1)
    has_tail = ids.shape[-1] < logits.shape[-1]  # K < V
    tail_t = (1 - t.sum(-1)).clamp(min=0) * has_tail  # (K = V: 0, not fp16 noise)
    tail = torch.xlogy(tail_t, tail_t) - tail_t * log_tail_p
    head = (torch.xlogy(t, t) - t * logp).sum(-1)
    return (head + tail).mean()

def smooth_kd_loss(logits, ids, t):
    # label smoothing: the V - K ids outside the top K share the rest
    # evenly, u = (1 - T_K) / (V - K) each. Their term
    # sum_j u (log u - log p_j) needs only sum_j log p_j: all V's less K's
    logp_all = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    logp = logp_all.gather(-1, ids)
    n_tail = logits.shape[-1] - ids.shape[-1]  # (K = V: none)
    u = (1 - t.sum(-1)).clamp(min=0) * (n_tail > 0) / max(n_tail, 1)
    # (row sums by groups, then float64: no float64 copy of logp_all)
    total = group_reduce(logp_all, 'sum').sum(-1, dtype=torch.float64)
    tail_logp = (total - logp.sum(-1, dtype=torch.float64)).float()
    tail = n_tail * torch.xlogy(u, u) - u * tail_logp
    head = (torch.xlogy(t, t) - t * logp).sum(-1)
    return (head + tail).mean()

def naive_kd_loss(logits, ids, t, targets):
    # the "naive fix": the rest goes to the label, added to its weight
    # if it is among the K, else as one more entry
    rest = (1 - t.sum(-1, keepdim=True)).clamp(min=0)
    label = targets.unsqueeze(-1)
    hit = ids == label  # (B, T, K)
    missed = ~hit.any(-1, keepdim=True)
    w = torch.cat([t + rest * hit, rest * missed], -1)
    ids = torch.cat([ids, label], -1)
    return sparse_kd_loss(logits, ids, w)

# ---------------------------------------------------------------
# The student's objectives, by --loss (or --topk_tail's remedy, above)
# as f(logits, batch). The batch holds idx and targets (B, T), the
# cache's ids and w (B, T, K) and, for fullkd, the teacher's logits.
# rskd and topk are one loss: they differ in the cache they read
OBJECTIVES = dict(
    ce=lambda x, b: ce_loss(x, b['targets']),
    rskd=lambda x, b: sparse_kd_loss(x, b['ids'], b['w']),
    topk=lambda x, b: sparse_kd_loss(x, b['ids'], b['w']),
    ghost=lambda x, b: ghost_kd_loss(x, b['ids'], b['w']),
    smooth=lambda x, b: smooth_kd_loss(x, b['ids'], b['w']),
    naive=lambda x, b: naive_kd_loss(x, b['ids'], b['w'], b['targets']),
    fullkd=lambda x, b: full_kd_loss(x, b['teacher']),
)

# ---------------------------------------------------------------
# the cache formats, one per --method. The writer, verify, the
# reader, bench.py and the tests work from an entry's fields:
#   target:   (probs, opts, gens) -> {file name: tensor}
#   loss:     the --loss that trains on this cache
#   unbiased: E[w] = t (a test checks each entry that says so)
#   options:  {name: type}: the Config options the target reads; the
#             cache's meta.json records them (`meta`, `m` below)
#   files:    {name: (dtype, per, checks)}: the arrays it stores
#     dtype:  a numpy dtype, or 'ids': token ids (uint16)
#     per:    values a position: 'position' (one), an option ('k': k
#             of them) or 'entry' (as many as file `ragged` says)
#     checks: f(values, starts, meta) -> ok, on each batch written or
#             read; position r's values begin at values[starts[r]]
#   ragged:   the file that counts a position's entries, or None
#   decode:   (a, m) -> (ids, w): a batch's files (a: {name: a flat
#             tensor}) -> each stored id and its weight
# E.g. rs: draws [5 5 9] store lengths 2, ids [5 9], counts [2 1], and
# the next position's entries follow. seq_offsets[s]: where s begins
FORMATS = {
    'rs': dict(
        target=rs_target, loss='rskd', unbiased=True, ragged='lengths',
        options=dict(rounds=int, sampler=str),
        files=dict(lengths=('uint8', 'position', [at_least_1]),
                   ids=('ids', 'entry', [in_vocab, ascending]),
                   counts=('uint8', 'entry', [at_least_1, sums_to('rounds')])),
        decode=lambda a, m: (a['ids'], a['counts'] / m['rounds'])),  # c / N
    'topk': dict(
        target=topk_target, loss='topk', unbiased=False, ragged=None,
        options=dict(k=int),
        files=dict(ids=('ids', 'k', [in_vocab]),
                   probs=('float16', 'k', [probability, descending])),
        decode=lambda a, m: (a['ids'], a['probs'].float())),  # t_i
    'is': dict(
        target=is_target, loss='rskd', unbiased=True, ragged='lengths',
        options=dict(rounds=int, sampler=str, proposal_temperature=float),
        files=dict(lengths=('uint8', 'position', [at_least_1]),
                   ids=('ids', 'entry', [in_vocab, ascending]),
                   counts=('uint8', 'entry', [at_least_1, sums_to('rounds')]),
                   weights=('float32', 'entry', [positive])),
        decode=lambda a, m: (a['ids'], a['counts'] / m['rounds'] * a['weights'])),
}

# ---------------------------------------------------------------
# cache mode: run the teacher once, store its sparse targets

def seq_generators(seed, seqs, device):
    # a random stream per sequence: the draws do not depend on resume
    # points or ranks (on CUDA the teacher's kernels may depend on shapes)
    return [torch.Generator(device).manual_seed(stream_seed(seed, SAMPLING, s))
            for s in seqs]

@torch.no_grad()
def cache_batch(teacher, idx, seqs, V, cfg, env):
    # a batch's targets, a tensor per file of its format. padded=True:
    # the logits over the padded vocab, float32 even under autocast,
    # the pads -inf, so the softmax gives them 0 (out=: no copy)
    with env.ctx:
        logits = teacher(idx, padded=True)[:len(seqs)]
    probs = torch.softmax(logits, -1, out=logits)[..., :V]
    fmt = FORMATS[cfg.method]
    gens = seq_generators(cfg.seed, seqs, env.device)
    opts = gr.recorded_options(cfg, fmt)  # opts.x: cfg.x, x in fmt['options']
    return fmt['target'](probs, opts, gens)

def run_cache(cfg, env, loaded=None):  # loaded: bench.py's teacher
    tokens, S, V = load_split(cfg, cfg.split, env, cfg.max_seqs)
    T, B = cfg.block_size, cfg.batch_size
    teacher, teacher_id = loaded or gr.load_teacher(cfg.teacher, V, T, env)
    teacher = torch.compile(teacher) if env.compile else teacher
    data_id = gr.data_fingerprint(tokens, f'{cfg.data_dir}/{cfg.split}.bin', env)
    # write_cache: None if cache_dir holds this cache, complete; else
    # a writer. It resumes at sequence .start; .add(part, seqs, done)
    # stores a batch's part (None: this rank had no sequences), done:
    # the sequences all ranks have finished; .finish() -> tok/s
    cache = gr.write_cache(cfg, env, FORMATS, S, V, teacher_id, data_id)
    if cache is None:
        return None
    # one batch per rank: rank r takes sequences lo + r*B .. lo + r*B + B-1
    for lo in range(cache.start, S, B * env.world):
        first = lo + env.rank * B
        seqs = list(range(first, min(first + B, S)))
        part = None  # the last round may leave a rank none
        if seqs:
            idx = get_batch(tokens, seqs, T, env, rows=B)[0]
            part = cache_batch(teacher, idx, seqs, V, cfg, env)
        # on every rank: rank 0 gathers the parts, appends, commits
        cache.add(part, seqs, done=min(lo + B * env.world, S))
    return cache.finish()  # tok/s

def open_cache(cfg, loss, tokens, V, env, checked=True):
    # (meta, reader), refused unless the cache trains `loss` and was
    # made from this train.bin. reader(seqs) -> [ids, w], (B, T, K)
    # each. read_files(seqs): {file: its values, flat} (ids: int64),
    # crc32 and value checks passed (checked=False: bench.py's reads)
    data_id = gr.data_fingerprint(tokens, f'{cfg.data_dir}/train.bin', env)
    meta, read_files = gr.cache_reader(cfg, loss, V, data_id, FORMATS, checked)
    fmt = FORMATS[meta['method']]

    def reader(seqs):
        stored = read_files(seqs)
        ids, w = fmt['decode'](stored, meta)
        if fmt['ragged']:  # pad to the longest position
            ids, w = pad_rows(stored[fmt['ragged']], ids, w)
        if env.device_type == 'cuda':  # copied while the GPU works
            ids, w = ids.pin_memory(), w.pin_memory()
        shape = (len(seqs), cfg.block_size, -1)
        return [t.view(shape).to(env.device, non_blocking=True) for t in (ids, w)]
    return meta, reader

# ---------------------------------------------------------------
# teacher and train modes: one loop, CE or distillation

@torch.no_grad()
def evaluate(model, teacher, val, val_seqs, cfg, env, nbins=15):
    # loss, calibration (ECE), KL to the teacher and how often it would
    # accept the student's guesses: sums over val_seqs, split by rank
    model.eval()
    f64 = dict(dtype=torch.float64, device=env.device)
    nll, n, kl, accept = [torch.zeros((), **f64) for _ in range(4)]
    # per confidence bin: positions, top-1 probabilities, right guesses
    bins = torch.zeros(nbins, 3, **f64)
    mine = val_seqs[env.rank::env.world]
    for i in range(0, len(mine), cfg.batch_size):
        seqs = mine[i:i + cfg.batch_size]
        idx, y = get_batch(val, seqs, cfg.block_size, env, cfg.batch_size)
        with env.ctx:  # logits over the V real tokens, (B, T, V)
            logits = model(idx)[:len(seqs)]
            # (no teacher: t_logits = logits, a filler for zip, unused)
            t_logits = logits if teacher is None else teacher(idx)[:len(seqs)]
        for x, xt, yy in zip(by_rows(logits), by_rows(t_logits), by_rows(y)):
            logp = F.log_softmax(x.float(), dim=-1)  # (rows, V)
            nll += F.nll_loss(logp, yy, reduction='sum')
            n += yy.numel()
            logp_top, guess = logp.max(-1)
            conf = logp_top.exp()  # (rows,) top-1 probabilities
            b = (conf * nbins).long().clamp(0, nbins - 1)  # their bins
            one = torch.ones_like(conf)
            bins.index_add_(0, b, torch.stack([one, conf, guess == yy], -1).double())
            if teacher is not None:
                logt = F.log_softmax(xt.float(), dim=-1)
                kl += (logt.exp() * (logt - logp)).sum()
                # drafting for the teacher, it accepts sum_v min(p, t)
                accept += torch.minimum(logp.exp(), logt.exp()).sum()
    sums = [nll, n, kl, accept, bins]
    if env.ddp:
        for t in sums:
            dist.all_reduce(t)
    nll, n, kl, accept, bins = [t.tolist() for t in sums]
    model.train()
    # ECE = sum_b |right_b - conf_b| / n: accuracy less confidence, by bin
    out = dict(val_loss=nll / n, val_ppl=math.exp(nll / n),
               ece=sum(abs(right - c) for _, c, right in bins) / n,
               reliability=[[m, c / max(m, 1), right / max(m, 1)]
                            for m, c, right in bins])
    if teacher is not None:
        out.update(kl_teacher=kl / n, spec_accept=accept / n)
    return out

def get_lr(it, cfg):
    # linear warmup, then a cosine decay to min_lr
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    decay = (cfg.lr_decay_iters or cfg.max_iters) - cfg.warmup_iters
    ratio = min(1.0, (it - cfg.warmup_iters) / max(1, decay))
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)

def setup_train(cfg, env, ckpt):
    # data, cache, teacher, model, optimizer and a saved run. loss: what
    # the student learns from; objective: its OBJECTIVES entry
    loss = 'ce' if cfg.mode == 'teacher' else cfg.loss
    objective = loss if cfg.topk_tail == 'none' else cfg.topk_tail  # (topk's)
    tokens, S, V = load_split(cfg, 'train', env, cfg.max_seqs)
    val, S_val, _ = load_split(cfg, 'val', env)
    B, T = cfg.batch_size, cfg.block_size
    # accum / world (it dies unless world divides it, S holds a step)
    micro_steps = gr.micro_steps_per_rank(cfg, env.world, S)
    # the cache's targets; a teacher (the cache's, else --teacher; none
    # in teacher mode) and its id, for fullkd and the evals' KL
    cached = loss in {f['loss'] for f in FORMATS.values()}  # not ce, fullkd
    meta, reader = open_cache(cfg, loss, tokens, V, env) if cached else (None, None)
    teacher, teacher_id = gr.find_teacher(
        cfg, required=loss == 'fullkd', cache_meta=meta, vocab_size=V, env=env)
    gr.check_model_size(cfg, V, env, teacher)  # it must fit in memory
    torch.manual_seed(stream_seed(cfg.seed, INIT))
    model = gr.student_model(cfg, V, ckpt).to(env.device)  # (restore loads ckpt)
    optimizer = model.configure_optimizers(
        cfg.weight_decay, cfg.learning_rate, (0.9, 0.95), env.device_type)
    # float16 needs a GradScaler; bfloat16 and float32 do not
    scaler = torch.amp.GradScaler(env.device_type, enabled=env.dtype == 'float16')
    # (it, best): the ckpt's, refused if an input changed (each a name
    # or path and sha256; cache_reader's meta['identity']); new: 0, inf
    inputs = dict(cache=meta and meta['identity'], teacher=teacher_id,
                  data=gr.data_fingerprint(tokens, f'{cfg.data_dir}/train.bin', env),
                  val=gr.data_fingerprint(val, f'{cfg.data_dir}/val.bin', env))
    it, best = gr.restore(ckpt, model, optimizer, scaler, inputs, cfg)
    # a fixed val subset spread over the split (for a given B, eval_iters)
    spread = np.linspace(0, S_val - 1, min(cfg.eval_iters * B, S_val))
    val_seqs = np.unique(spread.round().astype(int)).tolist()

    def fetch(n):  # this rank's batch of the run's n-th micro-step
        if n >= cfg.max_iters * micro_steps:  # past the run's end
            return None
        # one series of draws: rank 0's B, rank 1's B, ..., then n + 1
        seqs = draw_seqs(S, cfg.seed, (n * env.world + env.rank) * B, B)
        idx, targets = get_batch(tokens, seqs, T, env)
        batch = dict(idx=idx, targets=targets)
        if reader:
            batch['ids'], batch['w'] = reader(seqs)
        return batch
    return SimpleNamespace(
        loss=loss, objective=objective, S=S, fetch=fetch, micro_steps=micro_steps,
        teacher=teacher, model=model, optimizer=optimizer, scaler=scaler, it=it,
        best=best, inputs=inputs, val=val, val_seqs=val_seqs)

def run_train(cfg, env, ckpt=None):  # ckpt: --resume's
    r = setup_train(cfg, env, ckpt)
    it, optimizer, scaler = r.it, r.optimizer, r.scaler
    model, teacher = r.model, r.teacher  # r.model: the plain model
    if env.compile:  # (and the teacher, if there is one)
        model, teacher = torch.compile(model), teacher and torch.compile(teacher)
    gpu = [torch.device(env.device).index] if env.device_type == 'cuda' else None
    train_model = DDP(model, device_ids=gpu) if env.ddp else model

    def loss_fn(logits, batch):
        if r.loss == 'fullkd':  # the teacher runs online
            with torch.no_grad(), env.ctx:
                batch['teacher'] = teacher(batch['idx'])
        loss = OBJECTIVES[r.objective](logits, batch)
        if cfg.alpha:  # label CE mixed in (the paper has none)
            loss = loss + cfg.alpha * ce_loss(logits, batch['targets'])
        return loss / r.micro_steps
    ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt')
    metrics_path = os.path.join(cfg.out_dir, 'metrics.jsonl')
    # the evals so far (resumed: the checkpoint's, not redone), on every
    # rank; rank 0 rewrites metrics.jsonl to hold just those
    evals = gr.start_metrics(metrics_path, ckpt, env.master)

    def save(it):  # atomically: model, optimizer, scaler, evals, RNG state
        gr.save_checkpoint(ckpt_path, r.model, optimizer, scaler, it,
                           r.best, dict(asdict(cfg), inputs=r.inputs), evals)
    tokens_per_step = cfg.batch_size * cfg.block_size * r.micro_steps * env.world
    if env.master:
        print(f"{cfg.mode} ({r.objective}): {r.S:,} sequences, "
              f"{tokens_per_step:,} tokens a step, {env.device} {env.dtype}")
    start, train_time, timed = it, 0.0, 0  # timed: steps in train_time
    # Ctrl-C or SIGTERM: `stop` notes it; the run saves and exits at
    # the next step's top. All ranks must stop at one step, so each
    # sends its flags (stop.flags) with the loss's all_reduce
    lossf, m, stopping = None, {}, False  # the last step's loss, eval
    batch = r.fetch(it * r.micro_steps)
    with gr.stop_requested() as stop:
        while True:
            due = it == cfg.max_iters or it % cfg.eval_interval == 0
            if due and it not in [e['iter'] for e in evals]:
                m = evaluate(model, teacher, r.val, r.val_seqs, cfg, env)
                gr.check_finite(it, ckpt_path, m['val_loss'])  # never save a NaN
                r.best = min(r.best, m['val_loss'])
                tok_s = tokens_per_step * timed / train_time if timed else None
                evals.append(dict(iter=it, loss=r.loss, seed=cfg.seed,
                                  train_loss=lossf, tok_s=tok_s, **m))
                if env.master:  # the checkpoint, then its line
                    save(it)
                    gr.log_eval(metrics_path, evals[-1])
            if it >= cfg.max_iters:
                break
            if stopping:
                if env.master:
                    save(it)
                stop.exit(f"saved {ckpt_path} at iter {it}: resume with "
                          f"the same command and --resume true")
            lr = get_lr(it, cfg)
            for param_group in optimizer.param_groups:
                param_group['lr'] = lr
            t0 = time.time()
            loss_sum = torch.zeros((), device=env.device)
            for micro in range(r.micro_steps):
                if env.ddp:  # sync gradients on the last micro-step
                    train_model.require_backward_grad_sync = micro == r.micro_steps - 1
                with env.ctx:
                    logits = train_model(batch['idx'])  # (B, T, V)
                loss = loss_fn(logits, batch)
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
                # the next micro-step's batch, read while the GPU works
                batch = r.fetch(it * r.micro_steps + micro + 1)
            # one all_reduce: the mean loss (gloo has no AVG) and signal
            # flags; one host sync with the grad norm (fp16's scaler: two)
            sums = torch.cat([loss_sum.view(1) / env.world, stop.flags(env)])
            if env.ddp:
                dist.all_reduce(sums)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                r.model.parameters(), cfg.grad_clip or math.inf)
            both = torch.cat([sums, grad_norm.view(1).to(sums)])
            lossf, *flags, grad_normf = both.tolist()
            stopping = stop.seen(flags)  # a signal on any rank
            # never step on a NaN (an inf gradient under fp16: the scaler skips)
            gr.check_finite(it, ckpt_path, lossf, grad_normf, scaled=scaler.is_enabled())
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            it += 1
            dt = time.time() - t0
            if it > start + 1:  # the first step warms up: not timed
                train_time, timed = train_time + dt, timed + 1
            if env.master and (it % cfg.log_interval == 0 or it == cfg.max_iters):
                step_time = train_time / timed if timed else dt
                gr.log_step(it, lossf, lr, dt, step_time, tokens_per_step,
                            r.model, cfg, env)
    if env.master and m:
        print(f"done: {ckpt_path}, val_loss {m['val_loss']:.4f}")

def main(argv=None):
    args = gr.parse_args(Config, argv, TEACHER, __doc__)
    # errors and signals: one line, an exit status, saved work kept
    with gr.entry_point():
        # cfg: defaults (TEACHER's in teacher mode) < resumed ckpt < command line
        cfg, ckpt = gr.resolve_config(Config, args, TEACHER, FORMATS, OBJECTIVES)
        env = gr.setup(cfg)
        # one run per output folder; --resume's ckpt unchanged since read
        with gr.ddp_teardown(env), gr.folder_lock(gr.output_folder(cfg, env), ckpt):
            if cfg.mode in ('teacher', 'train'):
                run_train(cfg, env, ckpt)
            elif cfg.mode == 'cache':
                run_cache(cfg, env)
            elif cfg.mode == 'verify':  # every sequence and the data
                gr.verify_cache(cfg, env, FORMATS)
            else:  # OUT_DIR/ckpt.pt as a Hugging Face folder, OUT_DIR/hf
                ckpt = gr.load_checkpoint(f'{cfg.out_dir}/ckpt.pt')
                export_hf(ckpt, f'{cfg.out_dir}/hf')

if __name__ == '__main__':
    main()
