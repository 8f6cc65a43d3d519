"""
Tokenize text into GPT-2 BPE tokens: OUT/train.bin, OUT/val.bin (uint16, EOT 50256 after every
document) and OUT/meta.json. A .txt/.md/.py file is one document, and so is each line of a .jsonl
file (its "text"); files are read in sorted order, and with --val_fraction f, document i goes to
val when ceil((i+1)*f) > ceil(i*f).

  python prepare_data.py                      # offline: the Python stdlib's source
  python prepare_data.py --input books/ web.jsonl --out data
"""
import argparse
import json
import math
import os
import re
import sysconfig
import time
import zlib
from contextlib import ExitStack

from guardrails import die, dumps, entry_point, folder_lock, replaced  # first (before numpy, torch)
import numpy as np

EXTENSIONS = ('.txt', '.md', '.py', '.jsonl')
OWN = ('train.bin', 'val.bin', 'meta.json')  # all that --out may hold
PIECE = 1 << 22  # big files are read ~4M characters at a time
# the end of the last non-space character before a space or newline: GPT-2's pre-tokenizer
# always splits there (no pattern runs on into space), so pieces tokenize as the whole does
CUT = re.compile(r'(?s:.*)\S(?=[ \n])')

def list_files(paths, extensions=EXTENSIONS):
    """The regular files among paths and in their folders; noted: others."""
    files = []
    for path in paths:
        if not os.path.lexists(path):
            die(f"input {path} does not exist")
        found = [] if os.path.isdir(path) else [path]
        for root, dirs, names in os.walk(path):  # (nothing for a file)
            dirs[:] = sorted(d for d in dirs if d != 'site-packages' and d[0] != '.')
            found += [os.path.join(root, n) for n in sorted(names) if n.endswith(extensions)]
        for f in found:
            if os.path.isfile(f):
                files.append(f)
            else:
                print(f"note: skipping {f}: not a regular file")
    return files

def documents(files):
    """(text, last): each non-blank document in pieces of about PIECE
    characters (cut at CUT), last=True on its final piece."""
    for path in files:
        with open(path, encoding='utf-8', errors='replace') as f:  # (latin-1 stdlib files)
            if path.endswith('.jsonl'):
                for lineno, line in enumerate(f, 1):
                    try:
                        text = json.loads(line)['text'] if line.strip() else ''
                    except (ValueError, KeyError, TypeError):
                        text = None
                    if not isinstance(text, str):
                        die(f"{path}:{lineno} is not a JSON object with a \"text\" string")
                    if text.strip():
                        yield text, True
                continue
            text, started = f.read(PIECE), False
            while more := f.read(PIECE):
                cut = CUT.match(text)
                cut = cut.end() if cut else len(text)
                yield text[:cut], False
                text, started = text[cut:] + more, True
            if started or text.strip():  # a blank file would be a lone EOT
                yield text, True

def load_tokenizer():
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:  # it downloads its BPE files on first use
        die(f"could not load the GPT-2 BPE files ({type(e).__name__}); offline, set "
            f"TIKTOKEN_CACHE_DIR to a folder that holds them")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--input', nargs='+', help="files or folders (.txt .md .py .jsonl); default: the stdlib")
    p.add_argument('--out', default='data', help="output folder")
    p.add_argument('--val_fraction', type=float, default=0.01, help="share of documents for val")
    args = p.parse_args(argv)
    with entry_point():  # one line for any error, an honest exit status
        if not 0 < args.val_fraction < 1:
            die(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
        sources = args.input or [sysconfig.get_paths()['stdlib']]
        files = list_files(sources, EXTENSIONS if args.input else ('.py',))
        if not files:
            die(f"no {'/'.join(EXTENSIONS)} files in {' '.join(sources)}")
        others = sorted(n for n in (os.listdir(args.out) if os.path.lexists(args.out) else [])
                        if n.removesuffix('.tmp') not in OWN + ('.lock',))  # never a cache or run
        if others:
            die(f"--out {args.out} holds {others[0]}, which prepare_data.py does not write: "
                f"pass a new folder, or one that holds only data")
        enc = load_tokenizer()
        with folder_lock(args.out):
            prepare(files, sources, enc, args)

def prepare(files, sources, enc, args):
    final = {s: os.path.join(args.out, f'{s}.bin') for s in ('train', 'val')}
    tokens, docs, crc = dict(train=0, val=0), dict(train=0, val=0), dict(train=0, val=0)
    total, done, t0 = sum(map(os.path.getsize, files)), 0, time.time()

    def flush(batch, out, last_batch=False):
        nonlocal done
        # encode_ordinary: special tokens in the text are plain text
        texts = [text for text, last in batch]
        for (text, last), ids in zip(batch, enc.encode_ordinary_batch(texts, num_threads=os.cpu_count())):
            i, f = docs['train'] + docs['val'], args.val_fraction  # i: the document's index
            split = 'val' if math.ceil((i + 1) * f) > math.ceil(i * f) else 'train'
            data = np.array(ids + [enc.eot_token] * last, dtype=np.uint16).tobytes()
            out[split].write(data)
            crc[split] = zlib.crc32(data, crc[split])  # checked by every read
            tokens[split] += len(ids) + last
            docs[split] += last
            done += len(text.encode(errors='replace'))
        done = total if last_batch else done  # (all of the input is read)
        n, dt, eta = tokens['train'] + tokens['val'], time.time() - t0, max(total - done, 0)
        print(f"\r{min(done / max(total, 1), 1):6.1%} {n:,} tokens {n / dt:,.0f} tok/s ETA "
              f"{dt * eta / max(done, 1):.0f}s", end='', flush=True)

    meta_path = os.path.join(args.out, 'meta.json')
    if any(os.path.exists(final[s] + '.tmp') for s in final):
        print(f"{args.out} holds an unfinished run (killed?): starting over")
    # all three written as temps; then the old meta.json goes, the .bin files
    # are renamed, the new meta.json last: no folder reads as a partial dataset
    with ExitStack() as renamed:
        meta = renamed.enter_context(replaced(meta_path))
        out = {s: renamed.enter_context(replaced(final[s])) for s in final}
        batch, chars = [], 0
        for text, last in documents(files):
            batch.append((text, last))
            chars += len(text)
            if chars > 4_000_000:  # ~4 MB of text a batch: bounded memory
                flush(batch, out)
                batch, chars = [], 0
        flush(batch, out, last_batch=True)
        print()
        for split in ('train', 'val'):
            if docs[split] == 0:
                die(f"the {split} split is empty: found {docs['train'] + docs['val']} non-empty "
                    f"documents, need at least 2 (and enough for --val_fraction {args.val_fraction})")
        meta.write(dumps(dict(
            tokenizer='gpt2', vocab_size=enc.n_vocab, eot=enc.eot_token, dtype='uint16',
            train_tokens=tokens['train'], val_tokens=tokens['val'], train_docs=docs['train'],
            val_docs=docs['val'], train_crc32=crc['train'], val_crc32=crc['val'],
            val_fraction=args.val_fraction, source=[os.path.abspath(s) for s in sources]),
            indent=1).encode())
        for f in (meta, *out.values()):  # whole on disk before the old meta.json goes
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(meta_path):
            os.remove(meta_path)
    print(f"wrote {args.out}: train {tokens['train']:,} tokens ({docs['train']} docs), "
          f"val {tokens['val']:,} tokens ({docs['val']} docs) in {time.time() - t0:.1f}s")

if __name__ == '__main__':
    main()
