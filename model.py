"""
A small GPT-2 style language model, shaped like nanoGPT's model.py.

The parameter names are GPT-2's own (transformer.h.0.attn.c_attn, ...), so that Hugging Face GPT-2
weights load into it with nothing but a transpose (see GPT.from_pretrained). At the end: the exact
and fast kernels that rskd.py's sparse targets sample and rank with (invert_cdf, top_k).
"""
import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # flash attention where the backend has it; the causal mask is built in
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2's own GELU, so HF weights give HF's logits
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # pre-LN residual blocks, as in GPT-2
        x = x + self.mlp(self.ln_2(x))
        return x


# Hugging Face's GPT-2 keeps these four as Conv1D, (in, out): transposed from and to nn.Linear's (out, in)
TRANSPOSED = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


@dataclass
class GPTConfig:
    block_size: int = 128    # longest sequence the position embedding covers
    vocab_size: int = 50257  # GPT-2 BPE; the real vocabulary, never the padded one
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128

    @property
    def padded_vocab_size(self):
        # the embedding table is padded to a multiple of 64 for fast GPU matmuls. The extra rows are
        # never a token: forward() drops their logits (padded=True: sets them to -inf), so that no
        # softmax gives them probability.
        return (self.vocab_size + 63) // 64 * 64


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings
        # GPT-2 init: N(0, 0.02), and residual projections scaled down by 1/sqrt(2 * n_layer)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        with torch.no_grad():
            self.lm_head.weight[config.vocab_size:].zero_()  # padding rows: never used, keep them inert
        self.float32_head = False  # teachers: the output layer in float32 even under autocast

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def forward(self, idx, padded=False):
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} tokens, block_size is {self.config.block_size}"
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        # the logits are exactly (B, T, V): the padded columns are sliced off (on CUDA after a matmul
        # of all 50,304 rows, a better shape for cuBLAS; on CPU by multiplying the real rows only), so
        # no softmax, sample, loss or metric can give them probability. padded=True (the cache's
        # teacher): all the columns, the padding at -inf, so that a softmax in place over these
        # aligned rows gives it exactly 0. On CPU the matmul and the softmax run faster over rows of
        # 50,304 than of 50,257: the quick-start teacher's forward 1.43x (RESULTS.md)
        V, weight = self.config.vocab_size, self.lm_head.weight
        with torch.autocast(x.device.type, enabled=False) if self.float32_head else nullcontext():
            # a teacher's logits in float32: in bfloat16 a logit of -40 is off by up to 0.125, so
            # every probability would carry an error of up to ~13%, and the cache would be exact
            # only for a perturbed teacher
            x = x.float() if self.float32_head else x
            if padded:
                logits = F.linear(x, weight)  # (B, T, padded V)
                logits[..., V:] = float('-inf')
                return logits
            if x.is_cuda:
                return F.linear(x, weight)[..., :V]  # (B, T, V)
            return F.linear(x, weight[:V])  # (B, T, V)

    def to_teacher(self, dtype):
        """A frozen teacher for inference under autocast to dtype: the blocks' matmul weights cast to
        it once (autocast would re-cast them on every forward), the embeddings, layer norms and the
        output layer kept in float32, and the logits computed in float32."""
        if dtype in ('bfloat16', 'float16'):
            for module in self.transformer.h.modules():
                if isinstance(module, nn.Linear):
                    module.to(getattr(torch, dtype))
        self.float32_head = True
        return self.eval().requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, ckpt):
        """The model a loaded checkpoint of ours holds (guardrails.load_checkpoint checks it)."""
        model = cls(GPTConfig(**ckpt['model_config']))
        model.load_state_dict(ckpt['model'])
        return model

    @classmethod
    def from_pretrained(cls, name_or_dir):
        """GPT-2 weights from Hugging Face (gpt2, gpt2-medium, gpt2-large, gpt2-xl or a local directory)."""
        import transformers  # only this path needs transformers
        transformers.logging.disable_progress_bar()
        hf = transformers.GPT2LMHeadModel.from_pretrained(name_or_dir)
        c = hf.config
        model = cls(GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size,
                              n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd))
        sd, hf_sd = model.state_dict(), hf.state_dict()
        with torch.no_grad():
            for k, v in hf_sd.items():
                if k.endswith(('attn.bias', 'attn.masked_bias')) or k == 'lm_head.weight':
                    continue  # causal-mask buffers in older files; lm_head is tied to wte
                v = v.t() if k.endswith(TRANSPOSED) else v
                sd[k][:v.shape[0]].copy_(v)  # wte gets the real rows; its padding stays zero
        return model

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """idx (B, T) continued by max_new_tokens tokens, each drawn from the softmax of the last
        logits / temperature (over the top_k most likely, if given), the context cropped to the
        last block_size tokens. top_k=1 is greedy decoding; generator makes the draws repeatable."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, -1, :].float() / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float('-inf'))
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, 1, generator=generator)), dim=1)
        return idx

    def save_pretrained(self, out_dir):
        """This model as a Hugging Face GPT2LMHeadModel folder (config.json, model.safetensors): the
        inverse of from_pretrained, with the real vocabulary rows only."""
        import transformers
        c = self.config
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
            n_head=c.n_head, bos_token_id=c.vocab_size - 1, eos_token_id=c.vocab_size - 1))
        sd = hf.state_dict()
        with torch.no_grad():
            for k, v in self.state_dict().items():
                v = v[:c.vocab_size] if k in ('transformer.wte.weight', 'lm_head.weight') else v
                sd[k].copy_(v.float().t() if k.endswith(TRANSPOSED) else v.float())
        hf.save_pretrained(out_dir)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # matrices (matmuls, embeddings) decay; biases and LayerNorm gains do not
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        # the fused kernel is much faster on CUDA; elsewhere the default implementation
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == 'cuda')

    def flops_per_token(self):
        # PaLM appendix B: 6N for the matmuls plus the attention scores, forward and backward
        N, cfg = self.num_params(), self.config
        return 6 * N + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_sec, device_name, dtype):
        # model flops utilization: achieved flops over the GPU's dense 16-bit peak; None for float32
        # runs and for GPUs not in the table
        peak = peak_flops(device_name) if dtype in ('bfloat16', 'float16') else None
        return self.flops_per_token() * tokens_per_sec / peak if peak else None


def export_hf(ckpt, out_dir):
    """A checkpoint of ours (a loaded, checked ckpt.pt) as a Hugging Face folder that transformers
    runs offline: the model (save_pretrained) and GPT-2's tokenizer files, made in a temp folder
    and renamed into place."""
    import shutil
    import transformers
    transformers.logging.disable_progress_bar()
    model = GPT.from_checkpoint(ckpt)
    tmp = out_dir + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    vocab, merges = gpt2_bpe_files()
    with open(f'{tmp}/vocab.json', 'w') as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(f'{tmp}/merges.txt', 'w') as f:
        f.write('#version: 0.2\n' + ''.join(m + '\n' for m in merges))
    transformers.GPT2TokenizerFast(f'{tmp}/vocab.json', f'{tmp}/merges.txt').save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def gpt2_bpe_files():
    """GPT-2's vocab.json and merges.txt, rebuilt from tiktoken's BPE ranks (bytes -> id): each
    merge is the last step of running BPE on its token's bytes with the merges ranked before it.
    Bytes are written as GPT-2's printable stand-ins (the byte-to-unicode table of its encoder)."""
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    ranks = enc._mergeable_ranks
    shown = [*range(33, 127), *range(161, 173), *range(174, 256)]
    stand_in = dict(zip(shown, map(chr, shown)))
    stand_in.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in shown)})

    def text(token):
        return ''.join(stand_in[b] for b in token)
    merges = []
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.get):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # merge the best-ranked pair, as BPE does
            i = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], math.inf))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    vocab = {text(t): r for t, r in ranks.items()}
    vocab['<|endoftext|>'] = enc.eot_token
    return vocab, merges


# dense bf16/fp16 tensor-core peaks (flop/s, no sparsity) from the vendors' data sheets, by the name
# torch.cuda.get_device_name() gives; the first entry that matches wins, so the specific ones go first
PEAK_FLOPS = [('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12), ('H200 NVL', 835e12),
              ('H200', 989e12), ('A100', 312e12), ('L40S', 362e12), ('L40', 181e12),
              ('L4', 121e12)]


def peak_flops(device_name):
    return next((flops for name, flops in PEAK_FLOPS if name in device_name), None)


# -----------------------------------------------------------------------------
# exact and fast sampling: the kernels behind rskd.py's sparse targets. Tokens are grouped in G groups
# of ~16, token j in group j % G, so that a (V // G, G) view reduces every group in one pass.


def invert_cdf(p, points, group_size=16):
    """The token at each point: p (rows, V), unnormalised probabilities; points (rows, N) in (0, 1].
    Point u picks the token whose interval of the CDF (groups in order, then their members) holds
    u * sum(p): token i with probability p_i / sum(p). The CDF has two levels, accumulated in float64: the group that holds the
    point, then the token in it. A flat float32 CDF would lose probabilities below ~1e-8, and rounding
    could land a point on a token of probability 0: here it never does."""
    V = p.shape[-1]
    mass = group_reduce(p, 'sum', group_size)  # (rows, G)
    cdf = mass.cumsum(-1, dtype=torch.float64)
    total = cdf[:, -1:]
    if not bool(((total > 0) & (total < math.inf)).all()):  # nothing to draw from (one sync)
        raise FloatingPointError("a row to sample has no finite mass: the teacher's probabilities are not "
                                 "finite, or a --proposal_temperature above 1 underflowed them; use one closer to 1")
    points = points * total  # (rows, N)
    group = torch.searchsorted(cdf, points).clamp_(max=cdf.shape[-1] - 1)  # the first cdf >= point
    cols = group_members(group, V, group_size)  # (rows, N, members)
    vals = p.gather(-1, cols.clamp(max=V - 1).flatten(1)).view(cols.shape).double()
    inner = vals.masked_fill_(cols >= V, 0).cumsum(-1)  # the group's own CDF
    # where the point lies in its group: cdf[group] is the group's END, so (point - end) / mass is in
    # (-1, 0], and + 1 makes it the share of the group's mass below the point; rescaled to the inner
    # CDF and kept in (0, the group's total], so that it never lands on a zero-probability token
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
