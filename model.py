"""
A small GPT-2 style language model, shaped like nanoGPT's model.py.

The parameter names are GPT-2's own (transformer.h.0.attn.c_attn, ...), so that Hugging Face GPT-2
weights load into it with nothing but a transpose (see GPT.from_pretrained).
"""
import math
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
        # never a token: forward() drops their logits before anything can take a softmax over them.
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

    def forward(self, idx):
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} tokens, block_size is {self.config.block_size}"
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        # the logits are exactly (B, T, V): the padded columns are sliced off (on CUDA after a matmul
        # of all 50,304 rows, a better shape for cuBLAS; on CPU by multiplying the real rows only), so
        # no softmax, sample, loss or metric can give them probability
        V, weight = self.config.vocab_size, self.lm_head.weight
        with torch.autocast(x.device.type, enabled=False) if self.float32_head else nullcontext():
            # a teacher's logits in float32: in bfloat16 a logit of -40 is off by up to 0.125, so
            # every probability would carry an error of up to ~13%, and the cache would be exact
            # only for a perturbed teacher
            x = x.float() if self.float32_head else x
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
    def from_pretrained(cls, name_or_dir):
        """GPT-2 weights from Hugging Face (gpt2, gpt2-medium, gpt2-large, gpt2-xl or a local directory)."""
        import transformers  # only this path needs transformers
        transformers.logging.disable_progress_bar()
        hf = transformers.GPT2LMHeadModel.from_pretrained(name_or_dir)
        c = hf.config
        model = cls(GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size,
                              n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd))
        sd, hf_sd = model.state_dict(), hf.state_dict()
        # HF's GPT-2 keeps these four as Conv1D, i.e. (in, out): transpose into nn.Linear's (out, in)
        transposed = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
        with torch.no_grad():
            for k, v in hf_sd.items():
                if k.endswith(('attn.bias', 'attn.masked_bias')) or k == 'lm_head.weight':
                    continue  # causal-mask buffers in older files; lm_head is tied to wte
                v = v.t() if k.endswith(transposed) else v
                sd[k][:v.shape[0]].copy_(v)  # wte gets the real rows; its padding stays zero
        return model

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


# dense bf16/fp16 tensor-core peaks (flop/s, no sparsity) from the vendors' data sheets, by the name
# torch.cuda.get_device_name() gives; the first entry that matches wins, so the specific ones go first
PEAK_FLOPS = [('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12), ('H200 NVL', 835e12),
              ('H200', 989e12), ('A100', 312e12), ('L40S', 362e12), ('L40', 181e12),
              ('L4', 121e12)]


def peak_flops(device_name):
    return next((flops for name, flops in PEAK_FLOPS if name in device_name), None)
