"""
Sample from a trained model, as nanoGPT's sample.py does.

  python sample.py                            # the quick-start student, out/ckpt.pt
  python sample.py --out_dir out-teacher --start "def main(" --num_samples 3
  python sample.py --start FILE:prompt.txt --temperature 0.8 --top_k 50

Works on any checkpoint rskd writes (a student's or a teacher's). The same --seed gives the
same text on CPU.
"""
import argparse
import os
import sys
from types import SimpleNamespace

from guardrails import die, entry_point, load_checkpoint, setup  # first (before torch)
import torch

from model import GPT


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out_dir', default='out', help="the folder of the ckpt.pt to sample from")
    p.add_argument('--start', default='\n', help="the prompt, or FILE:path to read it from a file")
    p.add_argument('--num_samples', type=int, default=3, help="samples to draw")
    p.add_argument('--max_new_tokens', type=int, default=200, help="tokens per sample")
    p.add_argument('--temperature', type=float, default=0.8, help="< 1: surer, > 1: more varied")
    p.add_argument('--top_k', type=int, default=200, help="draw from the k most likely tokens only")
    p.add_argument('--seed', type=int, default=1337)
    p.add_argument('--device', default='auto', help="auto | cpu | cuda | cuda:N")
    p.add_argument('--dtype', default='auto', choices=('auto', 'float32', 'bfloat16', 'float16'))
    args = p.parse_args(argv)
    with entry_point():  # one line for any error, an honest exit status
        for name in ('num_samples', 'max_new_tokens', 'top_k'):
            if getattr(args, name) < 1:
                die(f"--{name} must be at least 1, got {getattr(args, name)}")
        if not 0 < args.temperature < float('inf'):
            die(f"--temperature must be a positive number, got {args.temperature}")
        start = args.start
        if start.startswith('FILE:'):
            with open(start[5:], encoding='utf-8', errors='replace') as f:
                start = f.read()
        if not start:
            die("the prompt is empty: pass some text with --start (or a file that holds some)")
        ckpt = load_checkpoint(os.path.join(args.out_dir, 'ckpt.pt'))  # checked against its crc32
        if args.device.startswith('cuda') and not torch.cuda.is_available():
            die(f"--device {args.device}, but this PyTorch sees no CUDA GPU: use --device cpu")
        env = setup(SimpleNamespace(device=args.device, dtype=args.dtype, compile='false'))
        model = GPT.from_checkpoint(ckpt).eval().to(env.device)
        import tiktoken  # GPT-2's BPE, as prepare_data.py tokenizes
        enc = tiktoken.get_encoding('gpt2')
        ids = enc.encode(start, allowed_special={'<|endoftext|>'})
        V = model.config.vocab_size
        if max(ids) >= V:
            die(f"the prompt has tokens outside this model's vocabulary of {V}")
        # the prompt, cropped to the model's block_size by generate, once per sample
        idx = torch.tensor([ids] * args.num_samples, device=env.device)
        gen = torch.Generator(env.device).manual_seed(args.seed)
        with env.ctx:
            out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, gen)
        for row in out.tolist():
            print(enc.decode(row))
            print('---------------', flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
