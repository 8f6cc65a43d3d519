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
import sys
import sysconfig
import time
import zlib

import numpy as np

EXTENSIONS = ('.txt', '.md', '.py', '.jsonl')
PIECE = 1 << 22  # big files are read ~4M characters at a time
# the end of the last non-space character that a space or newline follows: GPT-2's pre-tokenizer always
# splits there (none of its patterns runs from non-space into space), so text cut at that point
# tokenizes to exactly the same tokens as the whole
CUT = re.compile(r'(?s:.*)\S(?=[ \n])')


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def list_files(paths, extensions=EXTENSIONS):
    files = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d != 'site-packages' and not d.startswith('.'))
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(extensions)]
        else:
            die(f"input {path} does not exist")
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--input', nargs='+', help="files or folders (.txt .md .py .jsonl); default: the Python stdlib")
    p.add_argument('--out', default='data', help="output folder")
    p.add_argument('--val_fraction', type=float, default=0.01, help="fraction of documents held out for val")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        die(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    sources = args.input or [sysconfig.get_paths()['stdlib']]
    files = list_files(sources, EXTENSIONS if args.input else ('.py',))  # the default corpus is the stdlib's .py files
    if not files:
        die(f"no {'/'.join(EXTENSIONS)} files in {' '.join(sources)}")
    enc = load_tokenizer()
    os.makedirs(args.out, exist_ok=True)
    final = {s: os.path.join(args.out, f'{s}.bin') for s in ('train', 'val')}
    if any(os.path.exists(final[s] + '.tmp') for s in final):
        print(f"{args.out} holds an unfinished run (killed?): starting over")
    out = {s: open(final[s] + '.tmp', 'wb') for s in final}  # renamed into place only once complete
    n_tokens, n_docs = dict(train=0, val=0), dict(train=0, val=0)
    crc = dict(train=0, val=0)  # crc32 of each .bin, checked whenever a run reads it
    total_bytes, done_bytes, t0 = sum(os.path.getsize(f) for f in files), 0, time.time()

    def flush(batch):
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
            done_bytes += len(text)
        dt = time.time() - t0
        tok = n_tokens['train'] + n_tokens['val']
        eta = dt * max(total_bytes - done_bytes, 0) / max(done_bytes, 1)
        print(f"\r{min(done_bytes / total_bytes, 1):6.1%} {n_docs['train'] + n_docs['val']} docs "
              f"{tok:,} tokens {tok / dt:,.0f} tok/s ETA {eta:.0f}s", end='', flush=True)

    batch, batch_chars = [], 0
    for text, last in documents(files):
        batch.append((text, last))
        batch_chars += len(text)
        if batch_chars > 4_000_000:  # ~4 MB of text per batch keeps memory bounded
            flush(batch)
            batch, batch_chars = [], 0
    if batch:
        flush(batch)
    print()
    for f in out.values():
        f.flush()
        os.fsync(f.fileno())
        f.close()
    for split in ('train', 'val'):
        if n_docs[split] == 0:
            die(f"the {split} split is empty: found {n_docs['train'] + n_docs['val']} non-empty documents, "
                f"need at least 2 (and enough for --val_fraction {args.val_fraction})")
    # meta.json goes last: a folder without it (or with an old one that disagrees with the .bin sizes)
    # is never read as a finished dataset
    meta_path = os.path.join(args.out, 'meta.json')
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for split in final:
        os.replace(final[split] + '.tmp', final[split])
    meta = dict(tokenizer='gpt2', vocab_size=enc.n_vocab, eot=enc.eot_token, dtype='uint16',
                train_tokens=n_tokens['train'], val_tokens=n_tokens['val'],
                train_docs=n_docs['train'], val_docs=n_docs['val'],
                train_crc32=crc['train'], val_crc32=crc['val'],
                val_fraction=args.val_fraction, source=[os.path.abspath(s) for s in sources])
    with open(meta_path + '.tmp', 'w') as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + '.tmp', meta_path)
    print(f"wrote {args.out}: train {n_tokens['train']:,} tokens ({n_docs['train']} docs), "
          f"val {n_tokens['val']:,} tokens ({n_docs['val']} docs) in {time.time() - t0:.1f}s")


if __name__ == '__main__':
    main()
