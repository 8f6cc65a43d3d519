"""
rskd: Random Sampling Knowledge Distillation ("Sparse Logit Sampling", Anshumann et al., ACL 2025).
The teacher runs once; at each position we keep N draws from its distribution t as ids and counts,
an unbiased estimate of t at ~3 bytes per stored id, and the student trains on that sparse target.

  python prepare_data.py                                         # tokens -> data/
  python rskd.py --mode teacher                                  # a CE-trained teacher
  python rskd.py --mode cache --cache_dir cache-rs [--method topk]   # the teacher's sparse targets
  python rskd.py --mode train --loss rskd --cache_dir cache-rs   # (or topk, fullkd, ce) the student
  python rskd.py --mode bench                                    # speed, memory, gradient fidelity
  torchrun --standalone --nproc_per_node=8 rskd.py --mode cache ...   # any mode but bench, N GPUs
Read top to bottom: Config, data, the method, cache mode, training. Checks live in guardrails.py.
"""
import functools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from guardrails import (cache_memmaps, check_batch, check_batching, check_cache_for_run,
                        check_cache_options, check_data, check_model_size, check_step,
                        check_val_loss, commit_chunk, data_fingerprint, ddp_teardown, die,
                        file_units, find_teacher, finish_cache, folder_lock, gather_on_master,
                        load_teacher, log_eval, open_cache_files, opt, parse_args, progress_printer,
                        read_cache_meta, read_rows, recorded_options, resolve_config, restore,
                        resume_cache, save_checkpoint, setup, start_metrics, stop_everywhere,
                        stop_requested, user_errors, verify_cache)
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# config: opt(default, help, choices) is a field with its own --help text; parse_args makes the CLI

@dataclass
class Config:
    mode: str = opt('train', "what to run", ('teacher', 'cache', 'train', 'bench', 'verify'))
    data_dir: str = opt('data', "train.bin, val.bin and meta.json from prepare_data.py")
    out_dir: str = opt('out', "ckpt.pt, metrics.jsonl and bench.json go here")
    cache_dir: str = opt('cache-rs', "the teacher cache: written by --mode cache, read by training")
    teacher: str = opt('out-teacher/ckpt.pt', "a checkpoint, gpt2[-medium|-large|-xl] or an HF dir")
    resume: bool = opt(False, "continue the run saved in out_dir/ckpt.pt")
    max_seqs: int = opt(0, "use only the first max_seqs sequences of the split (0 = all)")
    # the student's shape (the teacher's is TEACHER below)
    n_layer: int = opt(2, "transformer blocks")
    n_head: int = opt(4, "attention heads")
    n_embd: int = opt(128, "embedding width")
    block_size: int = opt(128, "sequence length T; training windows and cache rows both use it")
    # optimisation
    batch_size: int = opt(16, "sequences per micro-step (and per cache chunk)")
    gradient_accumulation_steps: int = opt(1, "micro-steps per step, all ranks (torchrun: ranks)")
    max_iters: int = opt(200, "optimizer steps")
    lr_decay_iters: int = opt(0, "length of the cosine schedule (0 = max_iters), to extend a run")
    learning_rate: float = opt(3e-3, "peak learning rate")
    min_lr: float = opt(3e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = opt(20, "linear warmup steps")
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices")
    grad_clip: float = opt(1.0, "clip the gradient norm (0 = off)")
    eval_interval: int = opt(100, "evaluate and checkpoint every this many steps")
    eval_iters: int = opt(10, "val batches per eval: a fixed subset, the same for every run")
    log_interval: int = opt(10, "print a training line every this many steps")
    # the student's objective
    loss: str = opt('rskd', "the student's objective", ('rskd', 'topk', 'fullkd', 'ce'))
    topk_tail: str = opt('none', "Top-K's leftover mass: a bucket, smoothed, or to the label",
                         ('none', 'ghost', 'smooth', 'naive'))
    alpha: float = opt(0.0, "weight of ground-truth cross-entropy added to the KD loss")
    # what --mode cache stores
    method: str = opt('rs', "the sparse target: a method of FORMATS below (rs, topk, is)")
    sampler: str = opt('multinomial', "systematic: lower variance", ('multinomial', 'systematic'))
    rounds: int = opt(50, "RS draws per position, 1..255")
    proposal_temperature: float = opt(1.0, "tau != 1: draw from q ∝ t^tau, store t/q: an is cache")
    k: int = opt(12, "Top-K entries per position")
    split: str = opt('train', "the split --mode cache runs over", ('train', 'val'))
    commit_seconds: float = opt(5.0, "cache mode commits (fsyncs) at most this often")
    # hardware
    device: str = opt('auto', "auto (cuda if there is one, else cpu) | cpu | cuda | cuda:N")
    dtype: str = opt('auto', "auto: bfloat16 on GPUs that have it, else float16; float32 on CPU",
                     ('auto', 'float32', 'bfloat16', 'float16'))
    compile: str = opt('auto', "torch.compile (auto: on CUDA)", ('auto', 'true', 'false'))
    seed: int = opt(1337, "model init, data order and cache sampling all derive from it")

# --mode teacher trains a larger model (it must know more than the student) into its own folder
TEACHER = dict(out_dir='out-teacher', n_layer=4, n_head=4, n_embd=256, max_iters=250,
               eval_interval=125, learning_rate=2e-3, min_lr=2e-4)

# -----------------------------------------------------------------------------
# data: memory-mapped uint16 tokens; sequence s is the window tokens[s*T : s*T+T+1]

def load_split(cfg, split, env, max_seqs=0):
    # (tokens, S sequences, V); memory-mapped, so nothing of the corpus's size is read into RAM
    path, n, V = check_data(cfg.data_dir, split, cfg.block_size, max_seqs, env)  # size, ids < V
    tokens = np.memmap(path, dtype=np.uint16, mode='r', shape=(n,))
    return tokens, (n - 1) // cfg.block_size, V

def get_batch(tokens, seqs, T, env):
    # x = tokens[s*T : s*T+T], y = tokens[s*T+1 : s*T+T+1]: y is x shifted by one, the next tokens
    offsets = np.asarray(seqs, dtype=np.int64)[:, None] * T + np.arange(T + 1)  # (B, T+1)
    xy = torch.from_numpy(tokens[offsets].astype(np.int64))
    if env.type == 'cuda':
        xy = xy.pin_memory().to(env.device, non_blocking=True)
    return xy[:, :-1].to(env.device), xy[:, 1:].to(env.device)

# every random stream is keyed by (seed, purpose, index) through numpy's SeedSequence, which hashes the
# key: no two seeds share a data order or a sampling stream (seed + epoch would make seed 2's first
# epoch seed 1's second)
INIT, ORDER, SAMPLING = 0, 1, 2

def stream_seed(seed, purpose, index=0):
    return int(np.random.SeedSequence([seed, purpose, index]).generate_state(1, np.uint64)[0])

@functools.lru_cache(maxsize=2)
def epoch_permutation(S, seed, epoch):
    gen = torch.Generator().manual_seed(stream_seed(seed, ORDER, epoch))
    return torch.randperm(S, generator=gen).numpy()

def draw_seqs(S, seed, start, count):
    # draws start..start+count-1 of an endless stream of epochs, each a fresh permutation of the S
    # sequences: without replacement, and each draw a pure function of its number (exact resume)
    return [int(epoch_permutation(S, seed, i // S)[i % S]) for i in range(start, start + count)]

# -----------------------------------------------------------------------------
# the method, part 1: sparse targets. The teacher's probabilities (B, T, V) in, a few ids out

def rs_target(probs, cfg, gens):
    # RS-KD: at each position draw N = --rounds tokens from t, with replacement, and store each
    # distinct id once with its count c_i. The target t^s_i = c_i / N is an UNBIASED estimate of
    # t_i, since E[c_i] = N t_i: the student's gradient p - t^s (sparse_kd_loss) is the full-KD
    # gradient p - t in expectation. The paper's N = 50 leaves ~12 distinct ids (3B teacher).
    draws = sample_draws(probs, cfg.rounds, gens, cfg.sampler)  # (B, T, N), sorted per position
    lengths, ids, counts = run_lengths(draws)  # distinct ids per position; all ids, their counts
    return dict(lengths=lengths, ids=ids, counts=counts)

def is_target(probs, cfg, gens):
    # importance sampling, the paper's secondary variant: draw from a proposal q ∝ t^tau instead
    # (tau = --proposal_temperature) and store each drawn id's weight t_i / q_i. As E[c_i / N] =
    # q_i, the target (c_i / N)(t_i / q_i) is still an unbiased estimate of t_i. tau < 1 flattens q.
    proposal = probs.pow(cfg.proposal_temperature).flatten(0, 1)  # (B*T, V), q unnormalised
    target = rs_target(proposal.view(probs.shape), cfg, gens)  # N draws from q
    row = torch.arange(len(proposal), device=probs.device)
    row = row.repeat_interleave(target['lengths'].flatten())  # each stored id's position
    q = proposal[row, target['ids']] / proposal.sum(-1, dtype=torch.float64)[row]  # float64
    target['weights'] = (probs.flatten(0, 1)[row, target['ids']] / q).float()
    return target

def topk_target(probs, cfg, gens):
    # the baseline: the K most probable ids with their probabilities, NOT renormalised (vanilla
    # Top-K). The student never hears of the tail, and learns to be over-confident
    top = [top_k(chunk, cfg.k) for (chunk,) in by_rows(probs)]  # (values, ids) per chunk of rows
    values, ids = (torch.cat(parts) for parts in zip(*top))  # (B*T, K) each, most probable first
    return dict(ids=ids, probs=values.half())

# The cache format, one entry per method: target function, the --loss it trains, the fields its
# meta.json adds, and its files, name -> (dtype, one element per what); 'ids' is uint16, or int32 if
# V > 65536. A ragged method has 'entry' files, 'lengths' (ids per position) and 'seq_offsets':
# sequence s's entries lie between seq_offsets[s] and [s+1]. It drives writer, checks and reader.
FORMATS = {
    'rs': dict(target=rs_target, loss='rskd', meta=dict(rounds=int, sampler=str),
               files=dict(lengths=('uint8', 'position'), ids=('ids', 'entry'),
                          counts=('uint8', 'entry'), seq_offsets=('uint64', 'sequence'))),
    'topk': dict(target=topk_target, loss='topk', meta=dict(k=int),
                 files=dict(ids=('ids', 'k per position'), probs=('float16', 'k per position'))),
    'is': dict(target=is_target, loss='rskd',
               meta=dict(rounds=int, sampler=str, proposal_temperature=float),
               files=dict(lengths=('uint8', 'position'), ids=('ids', 'entry'),
                          counts=('uint8', 'entry'), weights=('float32', 'entry'),
                          seq_offsets=('uint64', 'sequence'))),
}

def stored_weights(meta, stored):
    # the reader's one branch per method: a batch's stored arrays -> (ids, weights) for the loss
    if meta['method'] == 'rs':  # t^s = c / N, padded to the longest position with weight 0
        return pad_rows(stored['lengths'], stored['ids'], stored['counts'] / meta['rounds'])
    if meta['method'] == 'topk':  # the teacher's own probabilities
        return stored['ids'], stored['probs'].float()
    if meta['method'] == 'is':  # (c / N)(t / q): drawn from q, unbiased for t
        w = stored['counts'] / meta['rounds'] * stored['weights']
        return pad_rows(stored['lengths'], stored['ids'], w)
    raise NotImplementedError(f"no reader for {meta['method']} caches: add it to stored_weights")

# -----------------------------------------------------------------------------
# the method, part 2: the losses. float32, (B, T, V) logits in, a scalar out; never a dense target

def sparse_kd_loss(logits, ids, w):
    # KL(t^s || p) = sum_i w_i (log w_i - log p_i) over the stored ids only, p the student's softmax
    # over the FULL vocabulary. RS-KD: w = c / N sums to 1, and the gradient w.r.t. the logits is
    # p - w, unbiased for full KD's p - t (importance sampling: (sum w) p - w, still p - t in
    # expectation). Vanilla Top-K: w = the top K probabilities, the gradient is (sum_K t) p - t_K:
    # biased. With sum w != 1 (Top-K, importance weights) it is no KL and can be < 0. Padding: w = 0
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, ids)  # (B, T, K)
    return (torch.xlogy(w, w) - w * logp).sum(-1).mean()

def ghost_kd_loss(logits, ids, t):
    # the Top-K tokens plus a "ghost" bucket for the rest of the mass, T_K = sum_K t, P_K = sum_K p:
    # L = sum_K t_i log(t_i / p_i) + (1 - T_K) log((1 - T_K) / (1 - P_K)).
    # log(1 - P_K) is a logsumexp over the tail's own logits: accurate even for a tiny tail
    logp_all = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    logp = logp_all.gather(-1, ids)
    # (the K slots get the most negative float, not -inf, so an empty tail (K = V) stays finite)
    log_tail_p = torch.logsumexp(logp_all.scatter(-1, ids, torch.finfo(torch.float32).min), dim=-1)
    tail_t = (1 - t.sum(-1)).clamp(min=0)
    if ids.shape[-1] == logits.shape[-1]:  # K = V leaves no tail: float16 rounding is not mass
        tail_t = torch.zeros_like(tail_t)
    tail = torch.xlogy(tail_t, tail_t) - tail_t * log_tail_p
    return ((torch.xlogy(t, t) - t * logp).sum(-1) + tail).mean()

def smooth_kd_loss(logits, ids, t):
    # label smoothing of the leftover mass: the V - K tokens outside the top K share 1 - T_K
    # evenly, u = (1 - T_K) / (V - K) each. Their term sum_{j not in K} u (log u - log p_j) needs
    # only the sum of their log p_j: the sum over the whole vocabulary minus the K gathered ones
    logp_all = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    logp = logp_all.gather(-1, ids)
    n_tail = logits.shape[-1] - ids.shape[-1]
    u = (1 - t.sum(-1)).clamp(min=0) / max(n_tail, 1)  # (K = V: no tail, and its sum below is 0)
    tail_logp = logp_all.sum(-1, dtype=torch.float64) - logp.sum(-1, dtype=torch.float64)
    tail = n_tail * torch.xlogy(u, u) - u * tail_logp.float()
    return ((torch.xlogy(t, t) - t * logp).sum(-1) + tail).mean()

def naive_kd_loss(logits, ids, t, targets):
    # the "naive fix": the leftover mass 1 - T_K goes to the ground-truth token, added to its weight
    # when it is among the K, else as one more entry; then the sparse KL as above
    rest = (1 - t.sum(-1, keepdim=True)).clamp(min=0)
    hit = ids == targets.unsqueeze(-1)  # (B, T, K)
    w = torch.cat([t + rest * hit, rest * ~hit.any(-1, keepdim=True)], -1)
    return sparse_kd_loss(logits, torch.cat([ids, targets.unsqueeze(-1)], -1), w)

def full_kd_loss(logits, teacher_logits):
    # KL(t || p) = sum_v t_v (log t_v - log p_v) over the whole vocabulary: the upper bound
    logt = F.log_softmax(teacher_logits.float(), dim=-1)
    return (logt.exp() * (logt - F.log_softmax(logits.float(), dim=-1))).sum(-1).mean()

def ce_loss(logits, targets):
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

# -----------------------------------------------------------------------------
# exactness and speed: how the targets above are computed (a first reading can skip this section)

def seq_generators(seed, seqs, device):
    # one random stream per sequence, seeded by (seed, sequence): the draws do not depend on resume
    # points or the number of ranks (on CUDA the teacher's kernels may depend on the batch shape)
    return [torch.Generator(device).manual_seed(stream_seed(seed, SAMPLING, s)) for s in seqs]

def sample_draws(probs, rounds, gens, sampler='multinomial', group_size=16):
    # `rounds` draws with replacement from each row of probs (B, T, V) (unnormalised is fine),
    # sorted per row. Each point in (0, 1] picks the token whose CDF interval (cdf[i-1], cdf[i]]
    # holds it: token i is drawn with probability exactly p_i. multinomial: `rounds` independent
    # uniform points. systematic: ONE uniform u per row and the grid (j + 1 - u) / N, j = 0..N-1:
    # point j is uniform on its own slice (j/N, (j+1)/N], so E[c_i] = N p_i, still unbiased, and
    # c_i is always floor or ceil of N p_i: far lower variance.
    B, T, V = probs.shape
    width = rounds if sampler == 'multinomial' else 1
    uniform = torch.stack([torch.rand(T, width, generator=gen, device=gen.device, dtype=torch.float64)
                           for gen in gens])  # (B, T, rounds or 1), one stream per sequence
    # A two-level CDF, accumulated in float64: the group of ~16 tokens (group_reduce's float32 sums)
    # holding the point, then its token: errors ~1e-7 relative, not a float32 CDF's 1e-8 absolute
    draws = []
    for p, u in by_rows(probs, uniform):
        mass = group_reduce(p, 'sum', group_size)  # (rows, n_groups)
        cdf = mass.cumsum(-1, dtype=torch.float64)
        if sampler == 'multinomial':
            points = 1 - u
        else:
            points = (torch.arange(1, rounds + 1, device=u.device) - u) / rounds
        points = points * cdf[:, -1:]  # (rows, rounds), ascending for systematic
        group = torch.searchsorted(cdf, points).clamp_(max=cdf.shape[-1] - 1)  # first cdf >= point
        cols = group_members(group, V, group_size)  # (rows, rounds, members)
        vals = p.gather(-1, cols.clamp(max=V - 1).flatten(1)).view(cols.shape).double()
        inner = vals.masked_fill_(cols >= V, 0).cumsum(-1)  # the chosen group's own CDF
        # the point's offset inside its group, rescaled to the inner CDF and kept in (0, total]:
        # float rounding can then never land it on a zero-probability token
        offset = (points - cdf.gather(-1, group)) / mass.gather(-1, group) + 1
        offset = (offset * inner[..., -1]).clamp_(min=torch.finfo(torch.float64).tiny)
        offset = torch.minimum(offset, inner[..., -1])
        member = torch.searchsorted(inner, offset.unsqueeze(-1))  # (rows, rounds, 1)
        draws.append(cols.gather(-1, member).squeeze(-1))
    return torch.cat(draws).view(B, T, rounds).sort(-1).values

def group_reduce(probs, op, group_size=16):
    # (..., V) -> (..., n_groups): the 'sum' or 'max' of each group of ~group_size tokens. Token j
    # is in group j % n_groups: one vectorised pass over a (V // n_groups, n_groups) view, plus the
    # last tokens, which join the first groups
    reduce, combine = (torch.sum, torch.add) if op == 'sum' else (torch.amax, torch.maximum)
    V = probs.shape[-1]
    n_groups = -(-V // group_size)
    full = V // n_groups * n_groups  # the tokens of the (V // n_groups, n_groups) view
    out = reduce(probs[..., :full].unflatten(-1, (-1, n_groups)), -2)
    out[..., :V - full] = combine(out[..., :V - full], probs[..., full:])
    return out

def group_members(groups, V, group_size=16):
    # group indices (...) -> the ids of their tokens (..., V // n_groups + 1); an id >= V is none
    n_groups = -(-V // group_size)
    return groups.unsqueeze(-1) + n_groups * torch.arange(V // n_groups + 1, device=groups.device)

def by_rows(*xs):
    # (B, T, ...) tensors -> chunks of matching positions, (rows, ...) views. On CPU 128 at a time:
    # a whole batch's temporaries would be fresh memory each call (page faults). CUDA takes it whole
    rows = 128 if xs[0].device.type == 'cpu' else xs[0].shape[0] * xs[0].shape[1]
    return zip(*(x.flatten(0, 1).split(rows) for x in xs))

def top_k(probs, k, group_size=16):
    # torch.topk(probs, k) as (values, ids), exact, and a few times faster on CPU for k << V: the k
    # largest values lie in the k groups (group_reduce) with the largest maxima, as a token outside
    # them is beaten by each of those k maxima. Only their members are sorted. (Ties may reorder.)
    V = probs.shape[-1]
    if k * group_size > V // 4:  # few groups: the candidates would cost more than a plain topk
        top = probs.topk(k, dim=-1)
        return top.values, top.indices
    groups = group_reduce(probs, 'max', group_size).topk(k, dim=-1).indices  # (..., k)
    cols = group_members(groups, V, group_size).flatten(-2)
    vals = probs.gather(-1, cols.clamp(max=V - 1)).masked_fill_(cols >= V, float('-inf'))
    top = vals.topk(k, dim=-1)
    return top.values, cols.gather(-1, top.indices)

def run_lengths(draws):
    # sorted draws (..., N) -> (lengths, ids, counts): per row the number of distinct ids, then all
    # rows' distinct ids (ascending within a row) with how often each was drawn, row after row
    new = torch.ones_like(draws, dtype=torch.bool)
    new[..., 1:] = draws[..., 1:] != draws[..., :-1]  # True where a run of equal ids starts
    starts = new.flatten().nonzero().squeeze(1)
    counts = torch.diff(starts, append=starts.new_tensor([draws.numel()]))
    return new.sum(-1), draws.flatten()[starts], counts

def pad_rows(lengths, ids, values):
    # ragged rows -> padded (R, K) ids and values, K the longest row; padding is id 0, value 0
    lengths = lengths.flatten().long()
    row = torch.repeat_interleave(torch.arange(len(lengths), device=ids.device), lengths)
    slot = torch.arange(len(ids), device=ids.device) - (lengths.cumsum(0) - lengths)[row]
    out_ids = torch.zeros(len(lengths), int(lengths.max()), dtype=torch.long, device=ids.device)
    out_values = torch.zeros(out_ids.shape, device=ids.device)
    out_ids[row, slot] = ids.long()
    out_values[row, slot] = values.float()
    return out_ids, out_values

# -----------------------------------------------------------------------------
# cache mode: run the teacher once and store its sparse targets, in the format of FORMATS

@torch.no_grad()
def cache_batch(teacher, idx, seqs, cfg, env, units):
    # the teacher's sparse targets for a batch of sequences: a flat array per file, in its own dtype
    with env.ctx:
        logits = teacher(idx).float()  # (B, T, V), the real vocabulary only
    # float32, and on CPU in place: a fresh 400 MB tensor per batch costs more in page faults there
    probs = torch.softmax(logits, -1, out=logits if env.type == 'cpu' else None)
    fmt, gens = FORMATS[cfg.method], seq_generators(cfg.seed, seqs, env.device)
    part = fmt['target'](probs, recorded_options(cfg, fmt), gens)  # only what its meta records
    if set(part) != set(fmt['files']) - {'seq_offsets'}:  # a fork's target and its table disagree
        raise RuntimeError(f"{cfg.method}: its target function must fill each of its files")
    return {name: t.cpu().numpy().reshape(-1).astype(units[name][0]) for name, t in part.items()}

def run_cache(cfg, env, loaded=None):
    tokens, S, V = load_split(cfg, cfg.split, env, cfg.max_seqs)
    T, B = cfg.block_size, cfg.batch_size
    check_cache_options(cfg, V)  # --k <= V
    teacher, teacher_info = loaded or load_teacher(cfg.teacher, V, T, env)  # (bench: loaded once)
    teacher = torch.compile(teacher) if env.compile else teacher
    data = data_fingerprint(tokens, os.path.join(cfg.data_dir, f'{cfg.split}.bin'), env)
    # meta.json: what the cache holds, what made it, how far it got (the only record of progress)
    meta = dict(format='rskd-cache', version=2, method=cfg.method, vocab_size=V, block_size=T,
                num_seqs=S, seed=cfg.seed, split=cfg.split, teacher=teacher_info, data=data,
                ids_dtype='uint16' if V <= 65536 else 'int32', dtype=env.dtype, device=env.type,
                device_name=env.name, batch_size=B, torch=torch.__version__,
                complete=False, seqs_done=0, entries=0)
    meta.update(vars(recorded_options(cfg, FORMATS[cfg.method])))  # what its target will see
    meta = resume_cache(cfg.cache_dir, meta, FORMATS, env)  # its saved progress; refuses another
    if meta['complete']:
        return None
    handles = open_cache_files(cfg.cache_dir, meta, FORMATS, env)  # rank 0's; cut to last commit
    units, pending = file_units(meta, FORMATS), []
    start, t0, committed = meta['seqs_done'], time.time(), time.time()
    progress = progress_printer('cache', 'positions', start * T, S * T)
    for lo in range(start, S, B * env.world):  # a round: rank r takes lo + r*B .. lo + (r+1)*B - 1
        seqs = list(range(lo + env.rank * B, min(lo + (env.rank + 1) * B, S)))
        part = None  # the last round can leave a rank without sequences
        if seqs:
            part = cache_batch(teacher, get_batch(tokens, seqs, T, env)[0], seqs, cfg, env, units)
        pending += gather_on_master(part, env)  # rank 0 writes all, in rank order = sequence order
        done = min(lo + B * env.world, S)
        if env.master and (done == S or time.time() - committed >= cfg.commit_seconds):
            # each file's parts appended and made durable, then meta.json: it never runs ahead
            commit_chunk(handles, pending, meta, done, cfg.cache_dir)
            pending, committed = [], time.time()
            progress(meta['seqs_done'] * T)
    return finish_cache(handles, meta, cfg.cache_dir, start, t0, env)  # tok/s, for the bench

def open_cache(cfg, loss, tokens, V, env, checked=True):
    # (meta, reader): reader(seqs) gives the batch's sparse targets (ids, w), each (B, T, K), from
    # the memory-mapped files, only those sequences' rows; what they mean is the cache's own method
    meta = read_cache_meta(cfg.cache_dir, FORMATS)
    data = data_fingerprint(tokens, os.path.join(cfg.data_dir, 'train.bin'), env)
    check_cache_for_run(meta, cfg, loss, V, data, FORMATS)  # complete, for this loss, T and data
    mm = cache_memmaps(cfg.cache_dir, meta, FORMATS)  # each file's size checked against meta.json
    units, files = file_units(meta, FORMATS), FORMATS[meta['method']]['files']
    ids_files = [name for name, (dtype, _) in files.items() if dtype == 'ids']  # to int64

    def reader(seqs):
        rows = read_rows(mm, units, meta, seqs)  # each file's elements of these sequences
        if checked:  # against their checksums and the format's values: damage stops the run here
            check_batch(mm, units, meta, seqs, rows, cfg.cache_dir)
        stored = {name: torch.from_numpy(a.astype(np.int64) if name in ids_files else a)
                  for name, a in rows.items()}
        ids, w = stored_weights(meta, stored)
        if env.type == 'cuda':  # copied while the GPU is busy with the previous step
            ids, w = ids.pin_memory(), w.pin_memory()
        return tuple(t.view(len(seqs), cfg.block_size, -1).to(env.device, non_blocking=True)
                     for t in (ids, w))
    return meta, reader

# -----------------------------------------------------------------------------
# teacher and train modes: one training loop, cross-entropy or distillation

def make_loss(name, cfg, env, teacher=None):
    # loss_fn(logits, idx, targets, sparse) -> the scalar to minimise; sparse: (ids, w), the cache's
    def loss_fn(logits, idx, targets, sparse):
        if name == 'ce':
            return ce_loss(logits, targets)
        if name == 'fullkd':  # the teacher runs online on the same batch, under the same autocast
            with torch.no_grad(), env.ctx:
                teacher_logits = teacher(idx)
            kd = full_kd_loss(logits, teacher_logits)
        elif name == 'topk' and cfg.topk_tail == 'ghost':
            kd = ghost_kd_loss(logits, *sparse)
        elif name == 'topk' and cfg.topk_tail == 'smooth':
            kd = smooth_kd_loss(logits, *sparse)
        elif name == 'topk' and cfg.topk_tail == 'naive':
            kd = naive_kd_loss(logits, *sparse, targets)
        else:
            kd = sparse_kd_loss(logits, *sparse)
        if cfg.alpha:  # optional ground-truth mixing (the paper uses none)
            kd = kd + cfg.alpha * ce_loss(logits, targets)
        return kd
    return loss_fn

NBINS = 15  # confidence bins of the ECE and the reliability diagram
@torch.no_grad()
def evaluate(model, teacher, val, val_seqs, cfg, env):
    # val loss, calibration (ECE) and agreement with the teacher: sums over this rank's share of the
    # fixed val subset, all-reduced, so the result is the same on any number of ranks
    model.eval()
    s = torch.zeros(4 + 3 * NBINS, dtype=torch.float64, device=env.device)  # nll n kl accept bins
    mine = val_seqs[env.rank::env.world]
    for i in range(0, len(mine), cfg.batch_size):
        idx, targets = get_batch(val, mine[i:i + cfg.batch_size], cfg.block_size, env)
        with env.ctx:
            logits = model(idx)
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        s[0] += F.nll_loss(logp.flatten(0, 1), targets.flatten(), reduction='sum')
        s[1] += targets.numel()
        # ECE: top-1 confidence in NBINS bins, sum_b (n_b / n) |accuracy_b - confidence_b|
        conf, pred = logp.max(-1)
        conf, correct = conf.exp().flatten(), (pred == targets).flatten().float()
        bins = (conf * NBINS).long().clamp(max=NBINS - 1)  # per bin: positions, conf., accuracy
        per_bin = torch.stack([torch.ones_like(conf), conf, correct]).double()  # (scattered: no sync)
        s[4:].view(3, NBINS).scatter_add_(1, bins.expand(3, -1), per_bin)
        if teacher is not None:  # KL(teacher || student), and speculative decoding's expected
            with env.ctx:  # acceptance with the student drafting: sum_v min(p, t) = 1 - TV
                logt = F.log_softmax(teacher(idx).float(), dim=-1)
            s[2] += (logt.exp() * (logt - logp)).sum()
            s[3] += torch.minimum(logp.exp(), logt.exp()).sum()
    if env.ddp:
        dist.all_reduce(s)
    model.train()
    s = s.tolist()
    n, bins = s[1], list(zip(s[4:4 + NBINS], s[4 + NBINS:4 + 2 * NBINS], s[4 + 2 * NBINS:]))
    out = dict(val_loss=s[0] / n, val_ppl=math.exp(s[0] / n),
               ece=sum(abs(acc - conf) for _, conf, acc in bins) / n,
               reliability=[[m, conf / max(m, 1), acc / max(m, 1)] for m, conf, acc in bins])
    if teacher is not None:
        out.update(kl_teacher=s[2] / n, spec_accept=s[3] / n)
    return out

def get_lr(it, cfg):
    # cosine decay with linear warmup; lr_decay_iters > max_iters leaves room to extend a run
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    ratio = min(1.0, (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)

def run_train(cfg, env, ckpt=None):
    loss_name = 'ce' if cfg.mode == 'teacher' else cfg.loss
    tokens, S, V = load_split(cfg, 'train', env, cfg.max_seqs)
    val, S_val, _ = load_split(cfg, 'val', env)
    T, B = cfg.block_size, cfg.batch_size
    micro_steps = check_batching(cfg, env.world, S)  # per rank; a step must fit the data
    # sparse targets come from the cache. The teacher is needed by fullkd, and otherwise feeds only
    # the kl_teacher/spec_accept metrics (the cache's own teacher if it still exists, or --teacher)
    sparse_kd = loss_name in ('rskd', 'topk')
    cache_meta, reader = open_cache(cfg, loss_name, tokens, V, env) if sparse_kd else (None, None)
    teacher = find_teacher(cfg, loss_name == 'fullkd', cache_meta, V, env)

    check_model_size(cfg, V, env)  # before allocating: weights, gradients and moments must fit
    torch.manual_seed(stream_seed(cfg.seed, INIT))
    shape = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    model = GPT(GPTConfig(block_size=T, vocab_size=V, **shape)).to(env.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.95), env.type)
    scaler = torch.amp.GradScaler(env.type, enabled=env.dtype == 'float16')  # bf16 needs none
    # exact resume: weights, optimizer moments, scaler, RNG and step, on the same training tokens
    data = data_fingerprint(tokens, os.path.join(cfg.data_dir, 'train.bin'), env)
    it, best_val_loss = restore(ckpt, model, optimizer, scaler, data) if ckpt else (0, math.inf)
    raw_model = model  # checkpoints hold the plain model: no _orig_mod. or module. prefixes
    if env.compile:
        model = torch.compile(model)
        teacher = torch.compile(teacher) if teacher is not None else None
    gpu = [torch.device(env.device).index] if env.type == 'cuda' else None
    train_model = DDP(model, device_ids=gpu) if env.ddp else model
    loss_fn = make_loss(loss_name, cfg, env, teacher)
    # a fixed val subset spread over the split, the same for every run
    val_seqs = np.unique(np.linspace(0, S_val - 1, min(cfg.eval_iters * B, S_val)).round().astype(int))
    ckpt_path, metrics_path = (os.path.join(cfg.out_dir, f) for f in ('ckpt.pt', 'metrics.jsonl'))
    tokens_per_step = B * T * micro_steps * env.world
    # every eval record so far (the checkpoint holds them; a resume rewrites metrics.jsonl from it)
    evals = start_metrics(metrics_path, ckpt) if env.master else []
    # a checkpoint: plain model, optimizer, scaler, RNG, step, config, evals; temp file, then rename
    save = functools.partial(save_checkpoint, ckpt_path, raw_model, optimizer, scaler)
    if env.master:
        print(f"{cfg.mode} ({loss_name}): {raw_model.num_params() / 1e6:.1f}M parameters, {S:,} "
              f"sequences of {T}, {tokens_per_step:,} tokens per step, {env.device} {env.dtype}"
              f"{', compiled' if env.compile else ''}{f', {env.world} ranks' if env.ddp else ''}")

    def fetch(micro_num):  # micro-batch number micro_num of this rank: sequences, tokens, targets
        seqs = draw_seqs(S, cfg.seed, (micro_num * env.world + env.rank) * B, B)  # (over all ranks)
        return (*get_batch(tokens, seqs, T, env), reader(seqs) if reader else None)

    start, train_time, train_tokens, lossf, m, batch = it, 0.0, 0, None, {}, None
    with stop_requested() as stop:  # Ctrl-C or SIGTERM: finish the step, save, exit
        while True:
            if (it == cfg.max_iters or it % cfg.eval_interval == 0) and not (ckpt and it == start):
                m = evaluate(model, teacher, val, val_seqs.tolist(), cfg, env)
                check_val_loss(m['val_loss'], it, ckpt_path)  # a NaN model is never saved
                if env.master:  # first the checkpoint, then the line that reports it
                    best_val_loss = min(best_val_loss, m['val_loss'])
                    evals.append(dict(iter=it, loss=loss_name, seed=cfg.seed, train_loss=lossf,
                                      tok_s=train_tokens / train_time if train_time else None, **m))
                    save(it, best_val_loss, dict(asdict(cfg), data=data), evals)
                    log_eval(metrics_path, evals[-1])
            if it >= cfg.max_iters:
                break
            if stop_everywhere(stop, env):  # every rank stops at the same step
                if env.master:
                    save(it, best_val_loss, dict(asdict(cfg), data=data), evals)
                    print(f"interrupted: saved {ckpt_path} at iter {it}. Resume with the same "
                          f"command plus --resume true")
                return
            lr = get_lr(it, cfg)
            for param_group in optimizer.param_groups:
                param_group['lr'] = lr
            t0 = time.time()
            loss_sum = torch.zeros((), device=env.device)
            batch = batch or fetch(it * micro_steps)
            for micro in range(micro_steps):
                idx, targets, sparse = batch
                if env.ddp:  # sync gradients only on the last micro-step (set before the forward)
                    train_model.require_backward_grad_sync = micro == micro_steps - 1
                with env.ctx:
                    logits = train_model(idx)  # (B, T, V)
                loss = loss_fn(logits, idx, targets, sparse) / micro_steps
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
                last = it + 1 == cfg.max_iters and micro + 1 == micro_steps  # (nothing after the last)
                batch = None if last else fetch(it * micro_steps + micro + 1)  # read while the GPU runs
            if env.ddp:  # the mean over ranks (gloo has no AVG)
                dist.all_reduce(loss_sum)
                loss_sum /= env.world
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
            lossf, grad_normf = torch.stack([loss_sum, grad_norm.to(loss_sum)]).tolist()  # one sync
            # never step on a NaN: stop, and the last checkpoint stays the last good state (fp16's
            # GradScaler skips overflowed steps by itself, so there only the loss counts)
            check_step(lossf, grad_normf, scaler.is_enabled(), it, ckpt_path)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            it += 1
            dt = time.time() - t0
            if it > start + 1:  # the first step warms up (and compiles): not in the throughput
                train_time, train_tokens = train_time + dt, train_tokens + tokens_per_step
            if env.master and (it % cfg.log_interval == 0 or it == cfg.max_iters):
                mfu = raw_model.estimate_mfu(tokens_per_step / dt / env.world, env.name, env.dtype)
                eta = (cfg.max_iters - it) * (train_time / max(it - start - 1, 1) if train_time else dt)
                print(f"iter {it}/{cfg.max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms, "
                      f"{tokens_per_step / dt:,.0f} tok/s{f', mfu {mfu:.1%}' if mfu else ''}, "
                      f"ETA {eta:.0f}s", flush=True)
    if env.master and m:
        print(f"done: {cfg.out_dir} " + ', '.join(f"{k} {v:.4f}" for k, v in m.items() if k != 'reliability')
              + (f", train {train_tokens / train_time:,.0f} tok/s" if train_time else ''))

def main(argv=None):
    args = parse_args(Config, sys.argv[1:] if argv is None else argv, TEACHER, __doc__.split('\n')[1])
    cfg, ckpt = resolve_config(Config, args, TEACHER, FORMATS)  # defaults < resumed run < CLI
    env = setup(cfg)  # torchrun's rank, the device, --dtype's autocast context (env.ctx), --compile
    # Ctrl-C, a full disk, a read-only folder: one line, finished work kept; DDP torn down cleanly
    with ddp_teardown(env), user_errors(cfg), folder_lock(cfg, env, ckpt):  # one run per folder
        if cfg.mode in ('teacher', 'train'):
            run_train(cfg, env, ckpt)
        elif cfg.mode == 'cache':
            run_cache(cfg, env)
        elif cfg.mode == 'verify':  # every sequence of a cache against its checksum, and its data
            verify_cache(cfg, env, FORMATS)
        else:
            import bench
            bench.run_bench(cfg, env)

if __name__ == '__main__':
    main()
