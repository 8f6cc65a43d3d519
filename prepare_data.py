"""
Tokenize text into GPT-2 BPE tokens for rskd.py.

  python prepare_data.py                               # offline default: the Python standard library's source
  python prepare_data.py --input books/ web.jsonl --out data

Writes OUT/train.bin and OUT/val.bin (uint16 tokens, nanoGPT's layout, EOT 50256 after every document)
and OUT/meta.json. Each .txt/.md/.py file is one document, and so is each line of a .jsonl file (its
"text" field). The split is by document and deterministic: with --val_fraction f, document i goes to
val when ceil((i+1)*f) > ceil(i*f), i.e. documents 0, 1/f, 2/f, ... (files are read in sorted order).
Text is tokenized in batches on all cores and streamed to disk, so the corpus may be larger than RAM.
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

import numpy as np

from guardrails import die, entry_point, folder_lock, replaced, write_json

EXTENSIONS = ('.txt', '.md', '.py', '.jsonl')
OWN = ('train.bin', 'val.bin', 'meta.json')  # all that --out may hold
PIECE = 1 << 22  # big files are read ~4M characters at a time
# the end of the last non-space character that a space or newline follows: GPT-2's pre-tokenizer always
# splits there (none of its patterns runs from non-space into space), so text cut at that point
# tokenizes to exactly the same tokens as the whole
CUT = re.compile(r'(?s:.*)\S(?=[ \n])')


def list_files(paths, extensions=EXTENSIONS):
    """The regular files among paths and in their folders; anything else
    (a FIFO, socket, device or broken link) is skipped with a note."""
    files = []
    for path in paths:
        if not os.path.lexists(path):
            die(f"input {path} does not exist")
        found = [path]
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d != 'site-packages' and not d.startswith('.'))
                found += [os.path.join(root, n) for n in sorted(names) if n.endswith(extensions)]
        for f in found:
            if os.path.isfile(f):
                files.append(f)
            else:
                print(f"note: skipping {f}: not a regular file")
    return files

def documents(files):
    """(text, last) pairs: each non-blank document in pieces, last=True on its final piece. A .jsonl line
    is one piece; a file is cut into pieces of about PIECE characters (at CUT), so memory stays bounded."""
    for path in files:
        if path.endswith('.jsonl'):
            with open(path, encoding='utf-8', errors='replace') as f:
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
        with open(path, encoding='utf-8', errors='replace') as f:  # a few stdlib files are latin-1
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
    except Exception as e:  # tiktoken downloads its BPE files on first use; offline that fails
        die(f"could not load the GPT-2 BPE files ({type(e).__name__}); offline, set TIKTOKEN_CACHE_DIR "
            f"to a folder that holds them")


def check_out(out):
    """--out must be a folder that holds nothing but our own files (so
    that a cache or a run there is never replaced)."""
    if os.path.lexists(out) and not os.path.isdir(out):
        die(f"--out {out} is not a folder: pass a folder")
    others = sorted(n for n in (os.listdir(out) if os.path.isdir(out) else [])
                    if n.removesuffix('.tmp') not in OWN + ('.lock',))
    if others:
        die(f"--out {out} holds {others[0]}, which prepare_data.py does not "
            f"write: pass a new folder, or one that holds only data")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--input', nargs='+', help="files or folders (.txt .md .py .jsonl); default: the Python stdlib")
    p.add_argument('--out', default='data', help="output folder")
    p.add_argument('--val_fraction', type=float, default=0.01, help="fraction of documents held out for val")
    args = p.parse_args(argv)
    with entry_point():  # one line for any error, an honest exit status
        if not 0 < args.val_fraction < 1:
            die(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
        sources = args.input or [sysconfig.get_paths()['stdlib']]
        files = list_files(sources, EXTENSIONS if args.input else ('.py',))  # default: the stdlib's .py
        if not files:
            die(f"no {'/'.join(EXTENSIONS)} files in {' '.join(sources)}")
        check_out(args.out)
        enc = load_tokenizer()
        with folder_lock(args.out):
            prepare(files, sources, enc, args)


def prepare(files, sources, enc, args):
    final = {s: os.path.join(args.out, f'{s}.bin') for s in ('train', 'val')}
    n_tokens, n_docs = dict(train=0, val=0), dict(train=0, val=0)
    crc = dict(train=0, val=0)  # crc32 of each .bin, checked whenever a run reads it
    total_bytes, done_bytes, t0 = sum(os.path.getsize(f) for f in files), 0, time.time()

    def flush(batch, out, last_batch=False):
        nonlocal done_bytes
        # encode_ordinary: special tokens in the text are plain text; we add EOT ourselves
        texts = [text for text, last in batch]
        for (text, last), tokens in zip(batch, enc.encode_ordinary_batch(texts, num_threads=os.cpu_count())):
            i = n_docs['train'] + n_docs['val']  # this document's index in the corpus
            split = 'val' if math.ceil((i + 1) * args.val_fraction) > math.ceil(i * args.val_fraction) else 'train'
            data = np.array(tokens + [enc.eot_token] * last, dtype=np.uint16).tobytes()
            out[split].write(data)
            crc[split] = zlib.crc32(data, crc[split])
            n_tokens[split] += len(tokens) + last
            n_docs[split] += last
            done_bytes += len(text.encode(errors='replace'))
        done_bytes = total_bytes if last_batch else done_bytes  # (all of the input is read)
        dt = time.time() - t0
        tok = n_tokens['train'] + n_tokens['val']
        eta = dt * max(total_bytes - done_bytes, 0) / max(done_bytes, 1)
        print(f"\r{min(done_bytes / max(total_bytes, 1), 1):6.1%} {n_docs['train'] + n_docs['val']} docs "
              f"{tok:,} tokens {tok / dt:,.0f} tok/s ETA {eta:.0f}s", end='', flush=True)

    meta_path = os.path.join(args.out, 'meta.json')
    if any(os.path.exists(final[s] + '.tmp') for s in final):
        print(f"{args.out} holds an unfinished run (killed?): starting over")
    with ExitStack() as files_done:  # each .bin renamed into place once whole, removed on failure
        out = {s: files_done.enter_context(replaced(final[s])) for s in final}
        batch, batch_chars = [], 0
        for text, last in documents(files):
            batch.append((text, last))
            batch_chars += len(text)
            if batch_chars > 4_000_000:  # ~4 MB of text per batch keeps memory bounded
                flush(batch, out)
                batch, batch_chars = [], 0
        flush(batch, out, last_batch=True)
        print()
        for split in ('train', 'val'):
            if n_docs[split] == 0:
                die(f"the {split} split is empty: found {n_docs['train'] + n_docs['val']} non-empty documents, "
                    f"need at least 2 (and enough for --val_fraction {args.val_fraction})")
        for f in out.values():  # whole on disk before the old dataset's meta.json goes
            f.flush()
            os.fsync(f.fileno())
        # meta.json goes last: a folder without it is never read as a finished dataset
        if os.path.exists(meta_path):
            os.remove(meta_path)
    meta = dict(tokenizer='gpt2', vocab_size=enc.n_vocab, eot=enc.eot_token, dtype='uint16',
                train_tokens=n_tokens['train'], val_tokens=n_tokens['val'],
                train_docs=n_docs['train'], val_docs=n_docs['val'],
                train_crc32=crc['train'], val_crc32=crc['val'],
                val_fraction=args.val_fraction, source=[os.path.abspath(s) for s in sources])
    write_json(meta, meta_path)
    print(f"wrote {args.out}: train {n_tokens['train']:,} tokens ({n_docs['train']} docs), "
          f"val {n_tokens['val']:,} tokens ({n_docs['val']} docs) in {time.time() - t0:.1f}s")


if __name__ == '__main__':
    main()
