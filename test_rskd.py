"""
Tests for rskd: python -m pytest -q test_rskd.py

Most runs go through rskd.main() in-process, on a tiny model and a synthetic corpus with a 97-token
vocabulary (97 pads to 128, so the padding is always exercised). Statistical tests use fixed seeds and
tolerances of a few standard errors computed from the sample size.
"""
import contextlib
import dataclasses
import errno
import fcntl
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import guardrails
import model
import prepare_data
import rskd
from model import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
RSKD_PY = os.path.join(HERE, 'rskd.py')
V = 97
TINY = ['--n_layer', '1', '--n_head', '2', '--n_embd', '16', '--block_size', '16', '--batch_size', '4',
        '--eval_iters', '2', '--log_interval', '5', '--device', 'cpu', '--seed', '3', '--commit_seconds', '0']


# the value each cache option takes in the tests' caches (options that no format records are not given)
OPTIONS = dict(k=5, proposal_temperature=0.8)


def method_args(method):
    """--method and the test value of each option its FORMATS entry records."""
    options = rskd.FORMATS[method]['options']
    return ['--method', method, *[a for o in options if o in OPTIONS for a in (f'--{o}', OPTIONS[o])]]


def write_data(d, n_train=20000, n_val=2000, vocab=V, seed=0):
    """A corpus with something to learn: a random first-order Markov chain with peaky transitions."""
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(rng.dirichlet(np.full(vocab, 0.1), size=vocab), axis=1)
    n = n_train + n_val
    u, toks, t = rng.random(n), np.empty(n, np.uint16), 0
    for i in range(n):
        t = min(int(np.searchsorted(cdf[t], u[i])), vocab - 1)
        toks[i] = t
    toks[:n_train].tofile(os.path.join(d, 'train.bin'))
    toks[n_train:].tofile(os.path.join(d, 'val.bin'))
    meta = dict(tokenizer='gpt2', vocab_size=vocab, eot=vocab - 1, dtype='uint16', train_tokens=n_train,
                val_tokens=n_val, train_docs=1, val_docs=1, train_crc32=zlib.crc32(toks[:n_train].tobytes()),
                val_crc32=zlib.crc32(toks[n_train:].tobytes()), val_fraction=0.1, source=['synthetic'])
    guardrails.write_json(meta, os.path.join(d, 'meta.json'))
    return str(d)


def child_env(**extra):
    """A subprocess's environment: this one, plus the repository on the import path (children run in
    the test's own temporary folder, never in the repository)."""
    path = os.pathsep.join(filter(None, [HERE, os.environ.get('PYTHONPATH')]))
    return {**os.environ, 'PYTHONPATH': path, **extra}


TORCH_FLAGS = [(torch.backends.cuda.matmul, 'allow_tf32'), (torch.backends.cudnn, 'allow_tf32'),
               (torch.backends.cudnn, 'benchmark'), (torch.backends.cudnn, 'deterministic')]


@pytest.fixture(scope='session', autouse=True)
def session_folder(tmp_path_factory):
    """The session fixtures (data, teacher, caches) run in a temporary folder too, not the repository."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp('session'))
    yield
    os.chdir(old)


@pytest.fixture(autouse=True)
def isolated(tmp_path):
    """Each test runs in its own temporary folder, whatever the user has run in the repository (out/,
    cache-rs/...), and leaves the process as it found it, even when it fails: the working directory,
    the environment variables, torch's backend flags (saved by value) and the signal handlers."""
    cwd, environ = os.getcwd(), dict(os.environ)
    flags = [(obj, name, getattr(obj, name)) for obj, name in TORCH_FLAGS]
    precision, threads = torch.get_float32_matmul_precision(), torch.get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    os.chdir(tmp_path)
    try:
        yield
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        for obj, name, value in flags:
            setattr(obj, name, value)
        torch.set_float32_matmul_precision(precision)
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def run(*argv):
    argv = [str(a) for a in argv]
    if argv[:2] == ['--mode', 'bench']:  # the bench is a script of its own
        import bench
        return bench.main(argv[2:])
    rskd.main(argv)


def fail(capsys, *argv):
    """Run, expect the one-line error exit; return the message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(*argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err, err
    return err


def files_of(d):
    """Every file under d and its bytes, but the lock file (which holds the pid of the last run)."""
    return {os.path.relpath(os.path.join(r, n), d): open(os.path.join(r, n), 'rb').read()
            for r, _, names in os.walk(d) for n in names if n != '.lock' and os.path.exists(os.path.join(r, n))}


def final_weights(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)['model']


@pytest.fixture(scope='session')
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='session')
def teacher(tmp_path_factory, data):
    out = tmp_path_factory.mktemp('teacher')
    run('--mode', 'teacher', '--data_dir', data, '--out_dir', out, *TINY, '--n_layer', 2, '--n_embd', 32,
        '--batch_size', 16, '--max_iters', 200, '--eval_interval', 100, '--learning_rate', 1e-2, '--min_lr', 1e-3,
        '--warmup_iters', 10)
    return str(out / 'ckpt.pt')


@pytest.fixture(scope='session')
def caches(tmp_path_factory, data, teacher):
    # every format, so that a fork's new entry is tested with no new test code: caches[method] compressed
    # (the default), caches[method + '-plain'] with --compress false
    d = tmp_path_factory.mktemp('caches')
    for method, plain in ((m, p) for m in rskd.FORMATS for p in (False, True)):
        run('--mode', 'cache', '--data_dir', data, '--teacher', teacher, '--cache_dir', d / (method + '-plain' * plain),
            *method_args(method), *TINY, *['--compress', 'false'] * plain)
    return {m: str(d / m) for m in (*rskd.FORMATS, *(f'{m}-plain' for m in rskd.FORMATS))}


def storages():
    """Every format's two caches, compressed and plain: the keys of the caches fixture."""
    return [m + plain for m in rskd.FORMATS for plain in ('', '-plain')]

# ----------------------------------------------------------------------------- data and model


def test_prepare_data_round_trip(tmp_path):
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    corpus = tmp_path / 'corpus'
    (corpus / 'sub').mkdir(parents=True)
    docs = ["First document.\nWith two lines.", "Ünïcödé — and emoji 🙂 survive the round trip.",
            "a json line", "text that says <|endoftext|> is still plain text", "def f(x):\n    return x + 1\n"]
    (corpus / 'a.txt').write_text(docs[0])
    (corpus / 'b.md').write_text(docs[1])
    (corpus / 'd.jsonl').write_text(json.dumps({'text': docs[2]}) + '\n\n' + json.dumps({'text': docs[3]}) + '\n')
    (corpus / 'sub' / 'c.py').write_text(docs[4])
    (corpus / 'empty.txt').write_text('   \n')  # skipped: no text
    (corpus / 'image.png').write_bytes(b'\x89PNG')  # not a text extension: ignored
    for out in ('out1', 'out2'):
        prepare_data.main(['--input', str(corpus), '--out', str(tmp_path / out), '--val_fraction', '0.34'])
    assert files_of(tmp_path / 'out1') == files_of(tmp_path / 'out2')  # deterministic
    meta = json.loads((tmp_path / 'out1' / 'meta.json').read_text())
    # document i is val when ceil((i+1) f) > ceil(i f): for f = 0.34 that is documents 0 and 2
    expected = dict(train=[docs[1], docs[3], docs[4]], val=[docs[0], docs[2]])
    for split, texts in expected.items():
        tokens = np.fromfile(tmp_path / 'out1' / f'{split}.bin', dtype=np.uint16)
        assert len(tokens) == meta[f'{split}_tokens'] and meta[f'{split}_docs'] == len(texts)
        assert tokens[-1] == enc.eot_token and (tokens == enc.eot_token).sum() == len(texts)
        pieces = np.split(tokens, np.flatnonzero(tokens == enc.eot_token) + 1)[:-1]
        assert [enc.decode(p[:-1].tolist()) for p in pieces] == texts
    assert meta['vocab_size'] == 50257 and meta['eot'] == 50256 and meta['tokenizer'] == 'gpt2'
    for split in ('train', 'val'):  # the checksum every run checks
        assert meta[f'{split}_crc32'] == zlib.crc32(open(tmp_path / 'out1' / f'{split}.bin', 'rb').read())


def test_prepare_data_big_file_in_pieces(tmp_path, monkeypatch):
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    rng = np.random.default_rng(0)
    words = ['def', ' f(x):', '\n', '\n\n', '    ', 'return', ' ', '  ', '\t', 'héllo', '123', '!!', ' \n', "'s"]
    text = ''.join(rng.choice(words, size=20000))
    (tmp_path / 'big.txt').write_text(text)
    (tmp_path / 'small.txt').write_text('a second document')
    monkeypatch.setattr(prepare_data, 'PIECE', 500)  # ~200 pieces instead of one read
    prepare_data.main(['--input', str(tmp_path / 'big.txt'), str(tmp_path / 'small.txt'), '--out', str(tmp_path / 'o'),
                       '--val_fraction', '0.5'])
    val = np.fromfile(tmp_path / 'o' / 'val.bin', dtype=np.uint16).tolist()
    assert val == enc.encode_ordinary(text) + [enc.eot_token]  # exactly the whole file's tokens


def test_prepare_data_errors(tmp_path, capsys, monkeypatch):
    def error(*argv):
        with pytest.raises(SystemExit) as e:
            prepare_data.main([str(a) for a in argv])
        assert e.value.code == 1
        return capsys.readouterr().err
    assert 'does not exist' in error('--input', tmp_path / 'nope', '--out', tmp_path / 'o')
    (tmp_path / 'empty').mkdir()
    assert 'no .txt/.md/.py/.jsonl files' in error('--input', tmp_path / 'empty', '--out', tmp_path / 'o')
    (tmp_path / 'one.txt').write_text('only one document')
    assert 'split is empty' in error('--input', tmp_path / 'one.txt', '--out', tmp_path / 'o')
    (tmp_path / 'bad.jsonl').write_text('{"text": "fine"}\nnot json\n')
    assert 'bad.jsonl:2 is not a JSON object' in error('--input', tmp_path / 'bad.jsonl', '--out', tmp_path / 'o')
    (tmp_path / 'bad.jsonl').write_text('{"text": "fine"}\n{"text": 5}\n')
    assert 'bad.jsonl:2 is not a JSON object' in error('--input', tmp_path / 'bad.jsonl', '--out', tmp_path / 'o')
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    assert 'TIKTOKEN_CACHE_DIR' in error('--input', tmp_path / 'one.txt', '--out', tmp_path / 'o')


def kill_script(target, n, code, sig=signal.SIGKILL):
    """Python that sends itself sig (SIGKILL) on the n-th call of module.attr `target`, then runs `code`."""
    return (f"import os, signal, sys\nsys.path.insert(0, {HERE!r})\nimport importlib\n"
            f"mod, attr = {target.rsplit('.', 1)!r}\nm = importlib.import_module(mod)\norig, calls = getattr(m, attr), [0]\n"
            f"def hook(*a, **k):\n    calls[0] += 1\n    if calls[0] == {n}:\n        os.kill(os.getpid(), {int(sig)})\n"
            f"    return orig(*a, **k)\nsetattr(m, attr, hook)\nimport rskd\n{code}\n")


def run_killed(target, n, code, sig=signal.SIGKILL):
    p = subprocess.run([sys.executable, '-c', kill_script(target, n, code, sig)], capture_output=True, text=True, env=child_env())
    assert p.returncode == -sig, p.stderr
    return p


def test_prepare_data_killed_midway(tmp_path, capsys):
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    for i in range(5):
        (corpus / f'{i}.txt').write_text(f"document number {i} " * 50)

    def killed_run(out):  # prepare_data SIGKILLed while tokenizing its first batch, its .tmp files open
        script = (f"import os, signal, sys\nsys.path.insert(0, {HERE!r})\nimport prepare_data\n"
                  f"enc = prepare_data.load_tokenizer()\nclass Dying:\n    eot_token, n_vocab = enc.eot_token, enc.n_vocab\n"
                  f"    def encode_ordinary_batch(self, batch, num_threads):\n        os.kill(os.getpid(), signal.SIGKILL)\n"
                  f"prepare_data.load_tokenizer = Dying\nprepare_data.main(['--input', {str(corpus)!r}, '--out', {out!r}])\n")
        p = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=child_env())
        assert p.returncode == -signal.SIGKILL, p.stderr
    out, out2 = str(tmp_path / 'out'), str(tmp_path / 'out2')
    prepare_data.main(['--input', str(corpus), '--out', out])
    before = files_of(out)
    killed_run(out)  # a finished dataset stays as it was: the killed run only wrote .tmp files
    assert {k: v for k, v in files_of(out).items() if not k.endswith('.tmp')} == before
    killed_run(out2)  # with no earlier dataset: no meta.json, so nothing is read as finished
    assert os.path.exists(out2 + '/train.bin.tmp') and not os.path.exists(out2 + '/meta.json')
    assert 'meta.json not found' in fail(capsys, '--mode', 'train', '--data_dir', out2, '--out_dir', tmp_path / 'o')
    prepare_data.main(['--input', str(corpus), '--out', out2])
    assert 'unfinished run' in capsys.readouterr().out
    assert files_of(out2) == before


def test_seeds_never_share_a_data_order_or_a_sampling_stream():
    # every stream is keyed by (seed, purpose, index): with seed + epoch, seed 2's first epoch was
    # seed 1's second, and seed * 1_000_003 + sequence let seeds share sampling streams
    S = 50
    orders = {(seed, epoch): tuple(rskd.epoch_permutation(S, seed, epoch)) for seed in range(4) for epoch in range(4)}
    assert all(sorted(order) == list(range(S)) for order in orders.values())  # each epoch: every sequence once
    assert len(set(orders.values())) == len(orders)  # 16 distinct orders (a collision by chance: ~1e-62)
    assert rskd.draw_seqs(S, 1, S, S) == list(orders[1, 1])
    first = [torch.rand(4, generator=g) for g in rskd.seq_generators(1, [0], 'cpu') + rskd.seq_generators(0, [1_000_003], 'cpu')]
    assert not torch.equal(*first)


def test_model_shapes_and_padding():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=1, n_head=2, n_embd=16))
    assert model.config.padded_vocab_size == 128 and model.lm_head.weight.shape == (128, 16)
    assert model.transformer.wte.weight is model.lm_head.weight  # tied
    idx = torch.randint(0, V, (3, 16))
    assert model(idx).shape == (3, 16, V)  # the padded columns are not there to take probability
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu')
    for _ in range(3):
        rskd.ce_loss(model(idx), idx).backward()
        assert model.lm_head.weight.grad[V:].abs().sum() == 0
        opt.step()
        opt.zero_grad()
    assert model.lm_head.weight[V:].abs().sum() == 0
    # the cache's teacher: every padded column at -inf, so a softmax in place over the aligned rows gives
    # the padding exactly 0 and the real columns t itself
    teacher = model.to_teacher('float32')
    with torch.no_grad():
        full = teacher(idx, padded=True)
        assert full.shape == (3, 16, 128) and torch.isneginf(full[..., V:]).all()
        probs = torch.softmax(full, -1, out=full)
        assert (probs[..., V:] == 0).all()
        torch.testing.assert_close(probs[..., :V], torch.softmax(teacher(idx), -1), rtol=1e-6, atol=0)


def test_teacher_training_lowers_loss(teacher):
    lines = [json.loads(l) for l in open(os.path.join(os.path.dirname(teacher), 'metrics.jsonl'))]
    assert [l['iter'] for l in lines] == [0, 100, 200]
    assert lines[-1]['val_loss'] < lines[0]['val_loss'] - 0.5, lines  # from ~log(97) = 4.6 well down


def test_resume_equals_uninterrupted(tmp_path, data, caches):
    common = ['--mode', 'train', '--data_dir', data, '--cache_dir', caches['rs'], *TINY, '--eval_interval', 3]
    run(*common, '--out_dir', tmp_path / 'a', '--max_iters', 8)
    run(*common, '--out_dir', tmp_path / 'b', '--max_iters', 5, '--lr_decay_iters', 8)
    run('--mode', 'train', '--out_dir', tmp_path / 'b', '--resume', 'true', '--max_iters', 8)
    a, b = final_weights(tmp_path / 'a'), final_weights(tmp_path / 'b')
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(l) for l in open(tmp_path / 'a' / 'metrics.jsonl')]
    lb = [json.loads(l) for l in open(tmp_path / 'b' / 'metrics.jsonl')]
    assert [l['iter'] for l in la] == [0, 3, 6, 8] and [l['iter'] for l in lb] == [0, 3, 5, 6, 8]
    assert la[-1]['val_loss'] == lb[-1]['val_loss']

# ----------------------------------------------------------------------------- sampling


def sample_counts(p, rounds, rows, sampler, seed=0):
    """Dense (rows, V) counts from `rows` independent RS samples of the distribution p."""
    probs = p.expand(1, rows, len(p)).clone()
    lengths, ids, counts = rskd.run_lengths(rskd.sample_draws(probs, rounds, [torch.Generator().manual_seed(seed)], sampler))
    ids, c = rskd.pad_rows(lengths, ids, counts)
    return torch.zeros(rows, len(p)).scatter_add_(1, ids, c), lengths, ids


P = torch.tensor([0.41, 0.23, 0.13, 0.09, 0.07, 0.0, 0.04, 0.02, 0.007, 0.003])  # token 5 has probability 0
# 97 tokens: 7 strided groups of 13, plus 6 that join the first 6 groups and hold the largest probabilities;
# 1e-2 down to 1e-7, every 10th is 0
P97 = torch.logspace(-2, -7, 97).roll(91) * (torch.arange(97) % 10 != 5)
P97 = P97 / P97.sum()


@pytest.mark.parametrize('p', [P, P97], ids=['10 tokens', '97 tokens'])
def test_rs_multinomial_is_unbiased(p):
    N, M = 50, 4000
    counts, lengths, ids = sample_counts(p, N, M, 'multinomial')
    assert (counts.sum(1) == N).all() and counts[:, p == 0].sum() == 0
    est = counts.mean(0) / N
    tol = 5 * torch.sqrt(p * (1 - p) / (N * M)) + 1e-6  # 5 standard errors per token
    assert ((est - p).abs() <= tol).all(), (est, p)


@pytest.mark.parametrize('method', [m for m, f in rskd.FORMATS.items() if f['unbiased']])
def test_each_format_that_claims_it_is_unbiased(method):
    # M rows of the same distribution through the format's target and back through its weights, as a
    # training batch reads them: the mean of the per-row sparse targets estimates t, within 5 standard
    # errors measured from the rows themselves; a token of probability 0 is never stored
    fmt, M = rskd.FORMATS[method], 4000
    options = guardrails.recorded_options(rskd.Config(**{o: OPTIONS[o] for o in fmt['options'] if o in OPTIONS}), fmt)
    stored = fmt['target'](P.expand(1, M, len(P)).clone(), options, [torch.Generator().manual_seed(0)])
    ids, w = fmt['decode'](stored, vars(options))
    if fmt['ragged']:
        ids, w = rskd.pad_rows(stored[fmt['ragged']], ids, w)
    rows = torch.zeros(M, len(P)).scatter_add_(1, ids.view(M, -1), w.view(M, -1).float()).double()
    est, se = rows.mean(0), rows.std(0) / math.sqrt(M)
    assert ((est - P).abs() <= 5 * se + 1e-9).all(), (est, P, se)
    assert rows[:, P == 0].abs().max() == 0 and (se[P > 0] > 0).all()


def test_renormalised_topk_is_biased():
    tol = 5 * torch.sqrt(P * (1 - P) / (50 * 4000)) + 1e-6  # the test above's tolerance
    renorm = torch.zeros_like(P)
    top = P.topk(3)
    renorm[top.indices] = top.values / top.values.sum()  # renormalised Top-3
    assert (renorm - P).abs().max() > 20 * tol.max()


@pytest.mark.parametrize('p', [P, P97], ids=['10 tokens', '97 tokens'])
def test_rs_systematic_is_unbiased_with_floor_or_ceil_counts(p):
    N, M = 50, 4000
    counts, lengths, ids = sample_counts(p, N, M, 'systematic')
    assert (counts.sum(1) == N).all() and counts[:, p == 0].sum() == 0
    assert ((counts == torch.floor(N * p)) | (counts == torch.ceil(N * p))).all()
    # a floor/ceil count has variance at most 1/4, so the mean's standard error is at most 0.5 / (N sqrt(M))
    assert ((counts.mean(0) / N - p).abs() <= 5 * 0.5 / (N * math.sqrt(M)) + 1e-6).all()
    # and its error is far below multinomial's on the same budget
    multi = sample_counts(p, N, M, 'multinomial')[0]
    assert ((counts / N - p) ** 2).sum(1).mean() < 0.5 * ((multi / N - p) ** 2).sum(1).mean()


def test_rs_ids_are_unique_ascending_and_in_vocab():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 8, V) * 3, -1)
    for sampler in ('multinomial', 'systematic'):
        gens = rskd.seq_generators(0, [0, 1], 'cpu')
        lengths, ids, counts = rskd.run_lengths(rskd.sample_draws(probs.clone(), 50, gens, sampler))
        assert lengths.sum() == len(ids) and counts.sum() == 50 * 16
        for row in torch.split(ids, lengths.flatten().tolist()):
            assert (row[1:] > row[:-1]).all() and row.max() < V


def test_grouped_top_k_equals_torch_topk():
    torch.manual_seed(0)
    # 50257 = 3142 strided groups of 16, of which the first 3127 get a 16th token; small vocabularies with
    # small groups take the grouped path too; any values (logits below -1 as well), float16 as well
    for vocab, group, dtype in ((50257, 16, torch.float32), (V, 2, torch.float32), (V, 3, torch.float16), (1000, 7, torch.float32)):
        x = (torch.randn(2, 8, vocab) * 3 - 10).to(dtype)
        x[0, 0, vocab - 5:] = torch.tensor([5., 6., 7., 8., 9.])  # the largest in the tokens that join the first groups
        for k in (1, 5, 12, vocab // 8, vocab):  # the last one falls back to torch.topk
            values, ids = model.top_k(x, k, group)
            assert torch.equal(values, x.topk(k, dim=-1).values), (vocab, k)
            # the ids hold those values, each id once (among equal values the order may differ)
            assert torch.equal(x.gather(-1, ids), values) and (ids.sort(-1).values.diff(dim=-1) > 0).all()


def test_rs_draws_tiny_probabilities_at_their_rate():
    # 50,256 tokens of probability 1e-8 each behind one token of 0.9995: a float32 CDF rounds every one of
    # their intervals to nothing (1e-8 is below half a float32 step at 1.0), so they would never be drawn
    V_big, M, N = 50257, 1000, 2000
    p = torch.full((V_big,), 0.0005 / (V_big - 1))
    p[0] = 0.9995
    draws = rskd.sample_draws(p.expand(1, M, V_big).contiguous(), N, [torch.Generator().manual_seed(0)])
    tail, expected = (draws > 0).sum().item(), M * N * 0.0005  # 1000 expected
    assert abs(tail - expected) < 5 * math.sqrt(expected), tail


def read_rs_cache_with_numpy(d, seq):
    """The cache format (README, RESULTS.md), read with numpy alone: sequence seq's dense (T, V) target counts/rounds."""
    meta = json.load(open(os.path.join(d, 'meta.json')))
    T, V, N = meta['block_size'], meta['vocab_size'], meta['rounds']
    lengths = np.fromfile(os.path.join(d, 'lengths.bin'), dtype=np.uint8)
    ids = np.fromfile(os.path.join(d, 'ids.bin'), dtype=meta['ids_dtype'])
    counts = np.fromfile(os.path.join(d, 'counts.bin'), dtype=np.uint8)
    offsets = np.fromfile(os.path.join(d, 'seq_offsets.bin'), dtype=np.uint64)
    dense, e = np.zeros((T, V)), int(offsets[seq])
    for t in range(T):
        n = int(lengths[seq * T + t])
        dense[t, ids[e:e + n]] = counts[e:e + n] / N
        e += n
    assert e == offsets[seq + 1]
    return dense


def test_results_md_reads_a_cache_with_numpy_alone(caches):
    # RESULTS.md's snippet, as written (NumPy 2: a uint8 length plus an offset must not overflow)
    readme = open(os.path.join(HERE, 'RESULTS.md')).read()
    code = readme[readme.index("```python\nimport json, zlib, numpy as np") + len("```python\n"):]
    code = code[:code.index("```")].replace("'cache-rs/", repr(caches['rs'] + '/')[:-1])
    scope = {}
    exec(code, scope)
    s, t = scope['s'], scope['t']
    dense = read_rs_cache_with_numpy(caches['rs-plain'], s)[t]
    assert scope['target'] == {i: dense[i] for i in np.flatnonzero(dense)}


def test_the_readme_quick_start_ends_with_sample_py():
    readme = open(os.path.join(HERE, 'README.md')).read()
    block = readme.split('## Quick start')[1].split('```')[1]
    assert block.strip().splitlines()[-1].startswith('python sample.py')


def test_cache_files_follow_the_format(caches, data):
    d = caches['rs-plain']
    meta = json.load(open(os.path.join(d, 'meta.json')))
    S, T = meta['num_seqs'], meta['block_size']
    assert meta['complete'] and meta['seqs_done'] == S == (20000 - 1) // 16 and meta['rounds'] == 50
    lengths = np.fromfile(os.path.join(d, 'lengths.bin'), dtype=np.uint8)
    counts = np.fromfile(os.path.join(d, 'counts.bin'), dtype=np.uint8)
    ids = np.fromfile(os.path.join(d, 'ids.bin'), dtype=np.uint16)
    offsets = np.fromfile(os.path.join(d, 'seq_offsets.bin'), dtype=np.uint64)
    assert len(lengths) == S * T and lengths.sum() == len(ids) == len(counts) == meta['entries'] == offsets[-1]
    assert (np.add.reduceat(counts.astype(int), np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64)) == 50).all()
    assert ids.max() < V and (offsets[1:] - offsets[:-1] == lengths.reshape(S, T).sum(1)).all()
    cfg = rskd.Config(data_dir=data, cache_dir=d, block_size=16, device='cpu')
    env = guardrails.setup(cfg)
    _, targets = rskd.open_cache(cfg, 'rskd', rskd.load_split(cfg, 'train', env)[0], V, env)
    for seq in (0, 7, S - 1):
        ids_, w = targets([seq])
        ours = torch.zeros(T, V).scatter_add_(1, ids_[0], w[0]).numpy()
        assert np.allclose(ours, read_rs_cache_with_numpy(d, seq))
    # Top-K: ids and probabilities, descending, not renormalised
    tk = json.load(open(os.path.join(caches['topk-plain'], 'meta.json')))
    probs = np.fromfile(os.path.join(caches['topk-plain'], 'probs.bin'), dtype=np.float16).reshape(-1, tk['k'])
    assert probs.shape[0] == S * T and (np.diff(probs.astype(np.float32), axis=1) <= 0).all()
    assert (probs.astype(np.float32).sum(1) < 1.0 + 1e-2).all() and (probs.astype(np.float32).sum(1) < 0.999).any()
    ids = np.fromfile(os.path.join(caches['topk-plain'], 'ids.bin'), dtype=tk['ids_dtype']).reshape(-1, tk['k'])
    cfg = rskd.Config(data_dir=data, cache_dir=caches['topk-plain'], block_size=16, device='cpu')
    _, targets = rskd.open_cache(cfg, 'topk', rskd.load_split(cfg, 'train', env)[0], V, env)
    for seq in (0, S - 1):
        ids_, w = targets([seq])
        assert np.array_equal(ids_[0].numpy(), ids[seq * T:(seq + 1) * T])
        assert np.array_equal(w[0].numpy(), probs[seq * T:(seq + 1) * T].astype(np.float32))


def decoded(d):
    """A cache's values, every sequence, file by file (a compressed cache's blocks decoded), as bytes."""
    meta = guardrails.read_cache_meta(str(d), rskd.FORMATS)
    mm = guardrails.cache_memmaps(str(d), meta, rskd.FORMATS)
    rows = guardrails.read_rows(mm, meta, rskd.FORMATS, list(range(meta['num_seqs'])))
    return {f'{name}.bin': a.tobytes() for name, a in rows.items()}


@pytest.mark.parametrize('method', list(rskd.FORMATS))
def test_compressed_cache_round_trip(method, caches):
    # every stored array of the compressed cache equals the plain cache's file, byte for byte; the
    # files on disk are the blocks, their offsets and checksums and the vocabulary order
    d, plain = caches[method], caches[f'{method}-plain']
    meta, meta_plain = (json.load(open(os.path.join(x, 'meta.json'))) for x in (d, plain))
    assert meta['compress'] and not meta_plain['compress'] and meta['entries'] == meta_plain['entries']
    stored = {k: v for k, v in files_of(plain).items() if k[:-4] in rskd.FORMATS[method]['files']}
    assert decoded(d) == stored and decoded(plain) == stored
    files = files_of(d)
    assert set(files) == {'meta.json', 'blocks.bin', 'seq_offsets.bin', 'checksums.bin', 'vocab_order.bin'}
    offsets = np.frombuffer(files['seq_offsets.bin'], np.uint64)
    assert offsets[0] == 0 and offsets[-1] == len(files['blocks.bin']) == meta['block_bytes']
    assert (np.diff(offsets.astype(np.int64)) > 0).all() and len(offsets) == meta['num_seqs'] + 1
    # the vocabulary order: every id once, the data's most frequent first
    order = np.frombuffer(files['vocab_order.bin'], np.uint16)
    counts = np.bincount(np.fromfile(os.path.join(meta['data']['path']), np.uint16), minlength=V)
    assert sorted(order) == list(range(V)) and (np.diff(counts[order]) <= 0).all()
    if rskd.FORMATS[method]['ragged']:  # fewer bytes than the plain cache's files (3 B an entry)
        assert len(files['blocks.bin']) < 0.8 * sum(map(len, stored.values()))


def cache_args(data, teacher, d, *extra):
    return ['--mode', 'cache', '--data_dir', data, '--teacher', teacher, '--cache_dir', d, *TINY, *extra]


@pytest.mark.parametrize('method', list(rskd.FORMATS))
@pytest.mark.parametrize('where', ['rskd.cache_batch', 'guardrails.write_json'])
def test_cache_kill_and_resume_is_byte_identical(tmp_path, data, teacher, caches, where, method, capsys):
    ref, d = str(tmp_path / 'ref'), str(tmp_path / 'killed')
    args = cache_args(data, teacher, d, '--batch_size', 2, *method_args(method))
    run(*cache_args(data, teacher, ref, '--batch_size', 2, *method_args(method)))
    two, four = files_of(ref), files_of(caches[method])  # chunks of 2 sequences or of 4: the same cache
    metas = [json.loads(d.pop('meta.json')) for d in (two, four)]
    assert two == four and [m.pop('batch_size') for m in metas] == [2, 4]
    assert [m.pop('crc32') for m in metas] and metas[0] == metas[1]
    # killed during the 3rd chunk's sampling (the 2nd chunk's commit may still be in flight beside it), or
    # (write_json) after the 3rd chunk's data was written but before meta.json recorded it: meta.json says
    # 2 chunks (or 1) and the rerun picks up from there
    run_killed(where, 3 if where == 'rskd.cache_batch' else 4, f"rskd.main({[str(a) for a in args]!r})")
    meta = json.load(open(os.path.join(d, 'meta.json')))
    assert not meta['complete'] and meta['seqs_done'] in ((2, 4) if where == 'rskd.cache_batch' else (4,))
    assert 'incomplete' in fail(capsys, '--mode', 'train', '--data_dir', data, '--cache_dir', d, *TINY,
                                '--loss', rskd.FORMATS[method]['loss'], '--out_dir', tmp_path / 'o')
    run(*args)
    assert 'resuming' in capsys.readouterr().out
    assert files_of(d) == files_of(ref)
    run(*args)  # a finished cache is never rewritten
    assert 'nothing to do' in capsys.readouterr().out and files_of(d) == files_of(ref)


def test_a_cache_whose_meta_stops_short_of_complete_is_finished_by_a_rerun(tmp_path, data, teacher, caches, capsys):
    # every sequence committed, but meta.json says incomplete (hand-edited, or left by an older writer):
    # the rerun has nothing to sample, marks the cache complete and leaves its data as it was
    d = tmp_path / 'c'
    shutil.copytree(caches['rs'], d)
    edit_meta(d / 'meta.json', complete=False)
    run(*cache_args(data, teacher, str(d)))
    assert 'cache complete' in capsys.readouterr().out
    assert json.load(open(d / 'meta.json'))['complete']
    assert files_of(d) == files_of(caches['rs'])
    run(*cache_args(data, teacher, str(d)))
    assert 'nothing to do' in capsys.readouterr().out


@pytest.mark.parametrize('script, sig', [('rskd.py', signal.SIGINT), ('bench.py', signal.SIGINT),
                                         ('sample.py', signal.SIGINT), ('prepare_data.py', signal.SIGINT),
                                         ('rskd.py', signal.SIGTERM), ('prepare_data.py', signal.SIGTERM)])
def test_ctrl_c_while_the_modules_load_is_one_line(script, sig, tmp_path):
    # torch takes a second or two to import, before any entry point runs: a Ctrl-C (or a SIGTERM) then is
    # one line and exit 128 + the signal, not Python's traceback or a silent death. A stand-in numpy that
    # hangs holds the script inside its imports, just past the guard rails' (each script imports them
    # first)
    loading = tmp_path / 'loading'
    (tmp_path / 'numpy.py').write_text(f"open({str(loading)!r}, 'w').close()\nimport time\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, os.path.join(HERE, script)], cwd=tmp_path, text=True,
                         env=child_env(PYTHONPATH=str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not loading.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    line = f"interrupted ({sig.name}) while starting: nothing was done\n"
    assert (p.returncode, err) == (128 + sig, line), err
    # a program that imports the modules (pytest here) keeps its own Ctrl-C
    assert signal.getsignal(signal.SIGINT) is not guardrails.interrupted_while_starting


def test_a_signal_on_the_way_out_is_not_called_one_while_starting():
    # a script's early handler is left behind once its entry point is done (a second Ctrl-C as a stopped
    # run exits printed "interrupted while starting" after the real line): on the way out, signals are
    # ignored instead
    before = {s: signal.signal(s, guardrails.interrupted_while_starting) for s in guardrails.SIGNALS}
    try:
        with pytest.raises(SystemExit):
            with guardrails.entry_point():
                raise guardrails.Interrupted(signal.SIGINT)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in guardrails.SIGNALS)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_ctrl_c_in_cache_mode_is_one_line_and_resumes(tmp_path, data, teacher, caches):
    args = cache_args(data, teacher, str(tmp_path / 'c'))
    p = subprocess.run([sys.executable, '-c', kill_script('rskd.cache_batch', 3, f"rskd.main({args!r})", signal.SIGINT)],
                       capture_output=True, text=True, env=child_env())
    assert p.returncode == 130 and 'Traceback' not in p.stderr, p.stderr
    assert p.stderr.splitlines()[-1] == ("interrupted (SIGINT): work is kept up to the last save: rerun the "
                                         "same command to go on")
    run(*args)
    assert files_of(tmp_path / 'c') == files_of(caches['rs'])


def test_cache_mismatch_is_refused(tmp_path, data, teacher, caches, capsys):
    d = str(tmp_path / 'c')
    shutil.copytree(caches['rs'], d)
    before = files_of(d)
    assert 'different rounds' in fail(capsys, *cache_args(data, teacher, d, '--rounds', 20))
    assert 'different method' in fail(capsys, *cache_args(data, teacher, d, '--method', 'topk'))
    assert 'different num_seqs' in fail(capsys, *cache_args(data, teacher, d, '--max_seqs', 10))
    other = write_data(tmp_path / 'other', seed=1)
    assert 'different data' in fail(capsys, *cache_args(other, teacher, d))
    assert files_of(d) == before

# ----------------------------------------------------------------------------- losses and metrics


def test_rskd_with_the_exact_distribution_equals_full_kd():
    torch.manual_seed(0)
    logits, t_logits = torch.randn(2, 3, V, requires_grad=True), torch.randn(2, 3, V) * 2
    full = rskd.full_kd_loss(logits, t_logits)
    g_full, = torch.autograd.grad(full, logits)
    ids = torch.arange(V).expand(2, 3, V)
    sparse = rskd.sparse_kd_loss(logits, ids, torch.softmax(t_logits, -1))
    g_sparse, = torch.autograd.grad(sparse, logits)
    assert torch.allclose(full, sparse, atol=1e-5) and torch.allclose(g_full, g_sparse, atol=1e-7)


def test_rskd_gradient_is_unbiased_and_topk_is_not():
    torch.manual_seed(0)
    t_logits, s_logits = torch.randn(V), torch.randn(V)
    t, p = torch.softmax(t_logits, -1), torch.softmax(s_logits, -1)
    g_full = p - t  # the full-KD gradient w.r.t. the logits of one position
    N = 50

    def mean_rs_grad(M):  # the average of M independent RS gradients: the loss averages over M rows
        logits = s_logits.expand(1, M, V).clone().requires_grad_()
        lengths, ids, counts = rskd.run_lengths(rskd.sample_draws(t.expand(1, M, V).clone(), N, [torch.Generator().manual_seed(M)]))
        ids, w = rskd.pad_rows(lengths, ids, counts / N)
        g, = torch.autograd.grad(M * rskd.sparse_kd_loss(logits, ids.view(1, M, -1), w.view(1, M, -1)), logits)
        return g[0].sum(0) / M
    cos = lambda a, b: (a @ b / (a.norm() * b.norm())).item()
    g_small, g_big = mean_rs_grad(10), mean_rs_grad(20000)
    assert ((g_big - g_full).abs() <= 5 * torch.sqrt(t * (1 - t) / (N * 20000)) + 1e-6).all()
    assert cos(g_big, g_full) > 0.999 and cos(g_big, g_full) > cos(g_small, g_full)
    # vanilla Top-K: deterministic, gradient (sum_K t) p - t_K, far from the full-KD gradient
    top = t.topk(12)
    logits = s_logits.clone().requires_grad_()
    g_top, = torch.autograd.grad(rskd.sparse_kd_loss(logits.view(1, 1, V), top.indices.view(1, 1, -1), top.values.view(1, 1, -1)), logits)
    t_k = torch.zeros(V).scatter(0, top.indices, top.values)
    assert torch.allclose(g_top, top.values.sum() * p - t_k, atol=1e-6)
    assert (g_top - g_full).norm() > 50 * math.sqrt((1 - (t ** 2).sum()) / (N * 20000))  # 50 standard errors


@pytest.mark.parametrize('tau', [0.8, 1.2])
def test_importance_sampling_is_unbiased(tau):
    # draws from q ∝ t^tau, weights t / q: the mean of (c / N)(t / q) over M rows estimates t
    N, M = 50, 4000
    probs = P97.expand(1, M, V).clone()
    target = rskd.is_target(probs, rskd.Config(rounds=N, proposal_temperature=tau), [torch.Generator().manual_seed(0)])
    ids, w = rskd.pad_rows(target['lengths'], target['ids'], target['counts'] / N * target['weights'])
    est = torch.zeros(M, V).scatter_add_(1, ids, w).mean(0).double()
    q = P97.double() ** tau / (P97.double() ** tau).sum()
    weight = torch.where(P97 > 0, P97.double() / q, torch.zeros_like(q))
    # c_i ~ Binomial(N, q_i): the estimate's standard error is weight_i sqrt(q_i (1 - q_i) / (N M))
    tol = 5 * weight * torch.sqrt(q * (1 - q) / (N * M)) + 1e-7
    assert ((est - P97.double()).abs() <= tol).all()
    assert target['counts'].sum() == N * M and (target['weights'] > 0).all()
    # the stored weight is t / q to float32 precision, and tau moves the draws as it should
    drawn = torch.repeat_interleave(torch.arange(M), target['lengths'].flatten())
    assert torch.allclose(target['weights'].double(), weight[target['ids']], rtol=1e-6)
    plain = sample_counts(P97, N, M, 'multinomial')[1].float().mean()
    assert (target['lengths'].float().mean() > plain) == (tau < 1), (target['lengths'].float().mean(), plain)
    assert drawn.max() == M - 1


def test_is_cache_at_tau_1_is_the_rs_cache_plus_unit_weights(tmp_path, data, teacher, caches):
    run(*cache_args(data, teacher, tmp_path / 'is', '--method', 'is', '--compress', 'false'))
    rs, is_ = files_of(caches['rs-plain']), files_of(tmp_path / 'is')
    assert set(is_) == set(rs) | {'weights.bin'}
    for name in ('lengths.bin', 'ids.bin', 'counts.bin', 'seq_offsets.bin'):
        assert is_[name] == rs[name]  # the same draws
    assert np.abs(np.frombuffer(is_['weights.bin'], np.float32) - 1).max() < 1e-5
    assert json.loads(is_['meta.json'])['proposal_temperature'] == 1.0
    # a tau with --method rs is refused, not switched to is behind the user's back; is at 0.8 trains
    with pytest.raises(SystemExit):
        run(*cache_args(data, teacher, tmp_path / 'is8', '--proposal_temperature', 0.8))
    assert not os.path.exists(tmp_path / 'is8')
    run(*cache_args(data, teacher, tmp_path / 'is8', '--method', 'is', '--proposal_temperature', 0.8))
    meta = json.load(open(tmp_path / 'is8' / 'meta.json'))
    assert meta['method'] == 'is' and meta['proposal_temperature'] == 0.8
    assert meta['entries'] > json.loads(rs['meta.json'])['entries']  # a flatter proposal, more ids
    run('--mode', 'train', '--data_dir', data, '--cache_dir', tmp_path / 'is8', '--teacher', teacher, *TINY,
        '--max_iters', 4, '--eval_interval', 2, '--out_dir', tmp_path / 'o')
    lines = [json.loads(l) for l in open(tmp_path / 'o' / 'metrics.jsonl')]
    assert lines[-1]['val_loss'] < lines[0]['val_loss']


def dense_topk_remedy(t_logits, k, tail, targets):
    """The Top-K remedies' dense float64 targets: the top k probabilities, plus the leftover mass
    spread evenly over the other tokens (smooth) or given to the ground-truth token (naive)."""
    t = torch.softmax(t_logits.double(), -1)
    top = t.topk(k)
    dense = torch.zeros_like(t).scatter(-1, top.indices, top.values)
    rest = 1 - top.values.sum(-1, keepdim=True)
    if tail == 'smooth':
        dense = dense + rest / (t.shape[-1] - k) * (dense == 0)
    else:
        dense = dense.scatter_add(-1, targets.unsqueeze(-1), rest)
    return top.indices, top.values.float(), dense


@pytest.mark.parametrize('tail', ['smooth', 'naive'])
def test_topk_remedies_match_float64_and_their_gradient(tail):
    torch.manual_seed(0)
    logits = (torch.randn(2, 6, V) * 2).requires_grad_()
    t_logits = torch.randn(2, 6, V) * 3
    targets = torch.randint(0, V, (2, 6))
    targets[0, 0] = t_logits[0, 0].argmax()  # the label inside the top k (the naive fix adds to it)
    ids, t, dense = dense_topk_remedy(t_logits, 5, tail, targets)
    assert torch.allclose(dense.sum(-1), torch.ones(2, 6, dtype=torch.float64))
    if tail == 'smooth':
        loss = rskd.smooth_kd_loss(logits, ids, t)
    else:
        loss = rskd.naive_kd_loss(logits, ids, t, targets)
    logp = torch.log_softmax(logits.double(), -1)
    ref = (torch.xlogy(dense, dense) - dense * logp).sum(-1).mean()  # KL(target || p), float64
    assert abs(loss.item() - ref.item()) < 1e-5, (loss.item(), ref.item())
    g, = torch.autograd.grad(loss, logits)
    # the gradient of KL(q || p) w.r.t. the logits is (p - q) / positions, as q sums to 1
    expected = (torch.softmax(logits.double(), -1) - dense) / 12
    assert torch.allclose(g.double(), expected, atol=1e-7)
    if tail == 'smooth':  # K = V: no tail, the loss is full KD
        full = torch.arange(V).expand(2, 6, V)
        value = rskd.smooth_kd_loss(logits, full, torch.softmax(t_logits, -1))
        assert abs(value.item() - rskd.full_kd_loss(logits, t_logits).item()) < 1e-5


def ghost_float64(logits, ids, t):
    p = torch.softmax(logits.double(), -1)
    p_k, t = p.gather(-1, ids), t.double()
    T_K, P_K = t.sum(-1), p_k.sum(-1)
    tail = torch.where(T_K < 1, (1 - T_K) * torch.log((1 - T_K) / (1 - P_K)), torch.zeros_like(T_K))
    return ((t * torch.log(t / p_k)).sum(-1) + tail).mean()


def test_ghost_loss_matches_float64():
    torch.manual_seed(0)
    logits, t_logits = torch.randn(2, 4, V) * 2, torch.randn(2, 4, V) * 2
    top = torch.softmax(t_logits, -1).topk(5)
    assert abs(rskd.ghost_kd_loss(logits, top.indices, top.values).item() -
               ghost_float64(logits, top.indices, top.values).item()) < 1e-5
    # a tail mass near 0 for both: the student puts ~1e-6 and the teacher ~1e-7 outside the top 5
    logits = torch.full((1, 1, V), -6.0)
    logits[0, 0, :5] = torch.tensor([8.0, 7.5, 7.0, 6.0, 5.0])
    t = torch.tensor([[[0.4, 0.3, 0.2, 0.05, 0.05 - 1e-7]]])
    ids = torch.arange(5).view(1, 1, 5)
    ours, ref = rskd.ghost_kd_loss(logits, ids, t).item(), ghost_float64(logits, ids, t).item()
    assert abs(ours - ref) < 1e-5 * max(1, abs(ref)), (ours, ref)
    # K = V: an empty tail, and the loss is full KD
    logits = torch.randn(1, 2, V, requires_grad=True)
    t_logits = torch.randn(1, 2, V)
    ghost = rskd.ghost_kd_loss(logits, torch.arange(V).expand(1, 2, V), torch.softmax(t_logits, -1))
    g, = torch.autograd.grad(ghost, logits)
    assert torch.isfinite(g).all() and abs(ghost.item() - rskd.full_kd_loss(logits, t_logits).item()) < 1e-5


class FixedLogits(torch.nn.Module):
    """A 'model' that returns given logits whatever the input."""
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[:x.shape[0]]


def test_ece_and_spec_accept_by_hand():
    env = guardrails.setup(rskd.Config(device='cpu'))
    cfg = rskd.Config(batch_size=1, block_size=4)
    val = np.array([0, 1, 1, 2, 3], dtype=np.uint16)  # one sequence: x = 0 1 1 2, y = 1 1 2 3
    # top-1 confidences 0.9, 0.9, 0.6, 0.6 predicting token 1 each time: correct, correct, wrong, wrong
    probs = torch.tensor([[0.05, 0.9, 0.05, 0.0], [0.05, 0.9, 0.05, 0.0], [0.2, 0.6, 0.2, 0.0], [0.2, 0.6, 0.1, 0.1]])
    model = FixedLogits(torch.log(probs.clamp(min=1e-12)).unsqueeze(0))
    m = rskd.evaluate(model, model, val, [0], cfg, env)
    # bins: {0.9, 0.9} with accuracy 1 -> |1 - 0.9|; {0.6, 0.6} with accuracy 0 -> |0 - 0.6|
    assert abs(m['ece'] - (2 * 0.1 + 2 * 0.6) / 4) < 1e-6
    assert abs(m['spec_accept'] - 1) < 1e-6 and abs(m['kl_teacher']) < 1e-6  # student == teacher
    t_probs = torch.softmax(torch.randn(1, 4, 4), -1)
    m = rskd.evaluate(model, FixedLogits(torch.log(t_probs)), val, [0], cfg, env)
    tv = 0.5 * (probs - t_probs[0]).abs().sum(-1)
    assert abs(m['spec_accept'] - (1 - tv).mean().item()) < 1e-5
    assert abs(m['val_loss'] + torch.log(probs[torch.arange(4), torch.tensor([1, 1, 2, 3])]).mean().item()) < 1e-5


def test_an_eval_of_nan_logits_returns_nan_for_the_one_line_check():
    # a NaN confidence has no bin: evaluate must still return (val_loss NaN), so that check_finite can say
    # so in one line, rather than fail inside the binning
    env = guardrails.setup(rskd.Config(device='cpu'))
    cfg = rskd.Config(batch_size=1, block_size=4)
    val = np.array([0, 1, 1, 2, 3], dtype=np.uint16)
    logits = torch.zeros(1, 4, 4)
    logits[0, 2] = float('nan')
    m = rskd.evaluate(FixedLogits(logits), None, val, [0], cfg, env)
    assert math.isnan(m['val_loss']) and sum(n for n, _, _ in m['reliability']) == 4


FIELDS = {'crc32', 'iter', 'loss', 'seed', 'train_loss', 'tok_s', 'val_loss', 'val_ppl', 'ece', 'reliability', 'kl_teacher', 'spec_accept'}


@pytest.mark.parametrize('loss', [['rskd'], ['topk'], ['topk', '--topk_tail', 'ghost'], ['topk', '--topk_tail', 'smooth'],
                                  ['topk', '--topk_tail', 'naive'], ['fullkd'], ['ce'],
                                  ['rskd', '--alpha', '0.5']])
def test_each_loss_trains_and_logs_every_metric(tmp_path, data, teacher, caches, loss, capsys):
    cache = caches['topk' if loss[0] == 'topk' else 'rs']
    run('--mode', 'train', '--data_dir', data, '--cache_dir', cache, '--teacher', teacher, '--out_dir', tmp_path,
        *TINY, '--max_iters', 6, '--eval_interval', 3, '--loss', *loss)
    lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
    assert [l['iter'] for l in lines] == [0, 3, 6]
    for line in lines:
        assert set(line) == FIELDS and line['loss'] == loss[0]
        assert all(math.isfinite(line[k]) for k in ('val_loss', 'val_ppl', 'ece', 'kl_teacher', 'spec_accept'))
        assert 0 <= line['ece'] <= 1 and 0 < line['spec_accept'] <= 1 and line['kl_teacher'] >= -1e-6
    assert lines[-1]['val_loss'] < lines[0]['val_loss']
    assert 'done: ' in capsys.readouterr().out


def test_bench_writes_every_number(tmp_path, data, teacher, capsys):
    import bench
    capsys.readouterr()
    bench.main(['--data_dir', data, '--teacher', teacher, '--out_dir', str(tmp_path), *TINY])
    out = capsys.readouterr().out  # one line a measurement, then the tables: no inner run's lines
    assert len(out.splitlines()) < 60 and 'cache complete' not in out and out.count('measured ') == 5, out
    res = json.load(open(tmp_path / 'bench.json'))
    formats = set(rskd.FORMATS)  # every format is benched, with no edit of bench.py, compressed and plain
    caches = {*formats, *(f'{m} plain' for m in formats)}
    for key in ('step_ms', 'step_ratio_vs_ce', 'peak_mem_bytes'):
        assert set(res[key]) == {'ce', *caches, 'ghost', 'smooth', 'naive', 'fullkd'} and all(v >= 0 for v in res[key].values())
    assert all(v > 0 for v in res['step_ms'].values())
    assert res['teacher_fwd_tok_s'] > 0 and set(res['cache_tok_s']) == caches
    assert [len(res['cache_runs_tok_s'][k]) for k in ('fwd', *caches)] == [5 * len(caches)] + [5] * len(caches)
    # the storage: sizes of both, and compressed against plain in caching speed and step time
    assert set(res['compressed_cache_speed_vs_plain']) == set(res['compressed_step_vs_plain']) == formats
    assert all(0 < r < 10 for k in ('compressed_cache_speed_vs_plain', 'compressed_step_vs_plain') for r in res[k].values())
    assert res['cache_bytes']['rs']['per_entry'] < res['cache_bytes']['rs plain']['per_entry']
    assert f"rs cache compressed: {res['cache_bytes']['rs']['per_entry_growing']:.2f} bytes/entry" in out
    assert all(r > 0 for r in res['cache_ratio_vs_fwd'].values())
    r_eq = res['systematic_equal_storage_rounds']
    assert set(res['grad_angle_deg']) == {*formats, 'topk50', 'ghost', 'smooth', 'naive', 'systematic50',
                                          f'systematic{r_eq}', 'is0.8', 'is1.2'}
    assert all(0 <= a <= 180 for a in res['grad_angle_deg'].values())
    assert all(r > 0 for r in res['grad_norm_ratio_weights'].values())
    assert set(res['read_ms']) == caches and all(v['checked'] > 0 for v in res['read_ms'].values())
    assert res['pipeline_shape'] == '16x1024' and all(v > 0 for v in res['pipeline_host_ms'].values())
    assert set(res['host_batch_ms']) == caches and set(res['pipeline_host_ms']) == formats
    # the float32 output layer takes out most of what bfloat16 does to the teacher's probabilities
    errors = res['teacher_bf16']
    assert errors['float32 output layer']['kl_float32_to_bf16'] < errors['bfloat16 output layer']['kl_float32_to_bf16']

def test_help_comes_from_the_config_fields():
    p = subprocess.run([sys.executable, RSKD_PY, '--help'], capture_output=True, text=True, env=child_env())
    text = ' '.join(p.stdout.split())  # argparse wraps lines
    assert p.returncode == 0
    for f in dataclasses.fields(rskd.Config):
        assert f'--{f.name}' in text and ' '.join(f.metadata['help'].split()) in text, f.name
        for choice in f.metadata['choices'] or ():
            assert choice in text


def test_a_copied_entry_works_under_a_new_name(tmp_path, data, teacher, monkeypatch, capsys):
    # the fork's first step: FORMATS['rs2'] = dict(FORMATS['rs']), nothing else. It caches, verifies and
    # trains, and its cache holds what an rs cache holds
    monkeypatch.setitem(rskd.FORMATS, 'rs2', dict(rskd.FORMATS['rs']))
    run(*cache_args(data, teacher, tmp_path / 'c', '--method', 'rs2', '--max_seqs', 64))
    run(*cache_args(data, teacher, tmp_path / 'ref', '--max_seqs', 64))
    ours, ref = files_of(tmp_path / 'c'), files_of(tmp_path / 'ref')
    assert json.loads(ours.pop('meta.json'))['method'] == 'rs2' and json.loads(ref.pop('meta.json'))['method'] == 'rs'
    assert ours == ref
    capsys.readouterr()
    run('--mode', 'verify', '--data_dir', data, '--cache_dir', tmp_path / 'c', *TINY)
    assert 'is intact: 64 sequences' in capsys.readouterr().out
    run('--mode', 'train', '--data_dir', data, '--cache_dir', tmp_path / 'c', '--teacher', teacher, *TINY,
        '--max_seqs', 64, '--max_iters', 2, '--eval_interval', 2, '--out_dir', tmp_path / 'o')
    assert [json.loads(line)['iter'] for line in open(tmp_path / 'o' / 'metrics.jsonl')] == [0, 2]


def test_a_formats_own_option_may_be_negative(tmp_path, data, teacher, monkeypatch):
    # the guard rails range-check the options they know (RANGES); a fork's own option may be any finite
    # number. Here commit_seconds stands in for one, recorded by the entry (-1: commit every batch)
    entry = dict(rskd.FORMATS['rs'], options=dict(rskd.FORMATS['rs']['options'], commit_seconds=float))
    monkeypatch.setitem(rskd.FORMATS, 'rs_signed', entry)
    args = cache_args(data, teacher, tmp_path / 'c', '--method', 'rs_signed', '--max_seqs', 16, '--commit_seconds', -1)
    run(*args)
    assert json.load(open(tmp_path / 'c' / 'meta.json'))['commit_seconds'] == -1
    run('--mode', 'verify', '--data_dir', data, '--cache_dir', tmp_path / 'c', *TINY)
    run(*args)  # read back for a resume: complete, nothing to do
    assert TINY[-2] == '--commit_seconds'  # (training takes it from the cache)
    run('--mode', 'train', '--data_dir', data, '--cache_dir', tmp_path / 'c', '--teacher', teacher, *TINY[:-2],
        '--max_seqs', 16, '--max_iters', 1, '--eval_interval', 1, '--out_dir', tmp_path / 'o')
    assert [json.loads(line)['iter'] for line in open(tmp_path / 'o' / 'metrics.jsonl')] == [0, 1]


def top1_target(probs, opts, gens):
    """A new sparse target for the fork test: the most probable id, its probability, and its rank among
    the teacher's probabilities rounded to a tenth (a file that means something new)."""
    values, ids = model.top_k(probs.flatten(0, 1), 1)
    return dict(ids=ids, probs=values.half(), tenths=(values * 10).round().to(torch.uint8))


def tenths_valid(a, starts, meta):  # the new file's own value check
    return bool((a <= 10).all())


def top1_decode(stored, meta):
    return stored['ids'], stored['probs'].float()


def test_a_new_target_is_one_function_and_one_entry(tmp_path, data, teacher, monkeypatch, capsys):
    # the fork: a target function and one FORMATS entry with a file of its own, trained with an existing
    # loss. Cache mode, the checks, verify, the reader and the bench need nothing else
    entry = dict(target=top1_target, loss='topk', unbiased=False, ragged=None, decode=top1_decode, options={},
                 files=dict(ids=('ids', 'position', [guardrails.in_vocab]),
                            probs=('float16', 'position', [guardrails.probability]),
                            tenths=('uint8', 'position', [tenths_valid])))
    monkeypatch.setitem(rskd.FORMATS, 'top1', entry)
    run(*cache_args(data, teacher, tmp_path / 'c', '--method', 'top1', '--max_seqs', 64, '--compress', 'false'))
    # compressed (the default), its new file too: the blocks decode to the plain cache's files
    run(*cache_args(data, teacher, tmp_path / 'cz', '--method', 'top1', '--max_seqs', 64))
    assert decoded(tmp_path / 'cz') == {k: v for k, v in files_of(tmp_path / 'c').items() if k[:-4] in entry['files']}
    meta = json.load(open(tmp_path / 'c' / 'meta.json'))
    P = meta['num_seqs'] * meta['block_size']
    assert meta['complete'] and os.path.getsize(tmp_path / 'c' / 'ids.bin') == 2 * P
    probs = np.fromfile(tmp_path / 'c' / 'probs.bin', np.float16)
    tenths = np.fromfile(tmp_path / 'c' / 'tenths.bin', np.uint8)
    assert len(probs) == len(tenths) == P and (probs > 0).all() and (probs <= 1).all()
    assert (tenths <= 10).all() and np.abs(tenths - probs.astype(np.float32) * 10).max() <= 0.51
    run('--mode', 'train', '--data_dir', data, '--cache_dir', tmp_path / 'cz', '--teacher', teacher, *TINY,
        '--loss', 'topk', '--max_seqs', 64, '--max_iters', 2, '--eval_interval', 2, '--out_dir', tmp_path / 'o')
    assert [json.loads(line)['iter'] for line in open(tmp_path / 'o' / 'metrics.jsonl')] == [0, 2]
    # its new file is checksummed and value-checked like every other: a value its check refuses, with
    # the checksum recomputed, is caught by verify
    shutil.copytree(tmp_path / 'c', tmp_path / 'bad')
    np.memmap(tmp_path / 'bad' / 'tenths.bin', np.uint8, 'r+')[20] = 99
    units = guardrails.cache_files(meta, rskd.FORMATS)
    mm = {name: np.fromfile(tmp_path / 'bad' / f'{name}.bin', dt) for name, (dt, _) in units.items()}
    crc = guardrails.sequence_crcs(mm, units, meta, [1], {k: 0 for k in units})[0]
    np.memmap(tmp_path / 'bad' / 'checksums.bin', np.uint32, 'r+')[1] = crc
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run('--mode', 'verify', '--data_dir', data, '--cache_dir', tmp_path / 'bad', *TINY)
    assert 'damaged: sequences 1-1' in capsys.readouterr().out
    # whatever the fork forgets fails loudly, naming the missing piece: a loss that takes no such cache...
    assert 'is a top1 cache, --loss rskd needs a rs or is cache' in fail(
        capsys, '--mode', 'train', '--data_dir', data, '--cache_dir', tmp_path / 'c', *TINY, '--loss', 'rskd',
        '--max_seqs', 64)
    # ... a new file without value checks, refused before anything is written
    good = entry['files']
    monkeypatch.setitem(rskd.FORMATS['top1'], 'files', dict(good, tenths=('uint8', 'position', [])))
    with pytest.raises(RuntimeError, match="file 'tenths' has no value checks"):
        run(*cache_args(data, teacher, tmp_path / 'c4', '--method', 'top1'))
    assert not os.path.exists(tmp_path / 'c4' / 'meta.json')
    monkeypatch.setitem(rskd.FORMATS['top1'], 'files', good)
    # ... a missing piece of the entry
    monkeypatch.delitem(rskd.FORMATS['top1'], 'decode')
    with pytest.raises(RuntimeError, match=r"FORMATS\['top1'\] has no decode"):
        run(*cache_args(data, teacher, tmp_path / 'c6', '--method', 'top1'))
    monkeypatch.setitem(rskd.FORMATS['top1'], 'decode', top1_decode)
    # ... a target that fills a file the table does not list
    def extra_file(probs, opts, gens):
        return dict(top1_target(probs, opts, gens), weights=torch.ones(1))
    monkeypatch.setitem(rskd.FORMATS['top1'], 'target', extra_file)
    with pytest.raises(RuntimeError, match='must return exactly its files'):
        run(*cache_args(data, teacher, tmp_path / 'c2', '--method', 'top1'))

    # ... a target that reads an option its meta does not record (a resume could change it unseen)
    def unrecorded_option(probs, opts, gens):
        values, ids = model.top_k(probs.flatten(0, 1), opts.k)
        return dict(ids=ids, probs=values.half(), tenths=(values * 10).round().to(torch.uint8))
    monkeypatch.setitem(rskd.FORMATS['top1'], 'target', unrecorded_option)
    with pytest.raises(AttributeError, match="read the option k, which its FORMATS entry's options do not list"):
        run(*cache_args(data, teacher, tmp_path / 'c3', '--method', 'top1'))
    monkeypatch.setitem(rskd.FORMATS['top1'], 'target', top1_target)
    # ... and an option of another method is refused for this one
    assert '--k is an option of --method topk, not top1' in fail(
        capsys, *cache_args(data, teacher, tmp_path / 'c5', '--method', 'top1', '--k', 3))


def fork_mistakes():
    """name -> (a FORMATS entry 'bad' made from rs with one mistake, the words that must name it)."""
    rs = rskd.FORMATS['rs']

    def edited(edit):  # rs's target, its output edited
        def target(probs, opts, gens):
            return edit(rskd.rs_target(probs, opts, gens))
        return dict(rs, target=target)
    return {
        'no loss': ({k: v for k, v in rs.items() if k != 'loss'}, "FORMATS['bad'] has no loss"),
        'a loss without an objective': (dict(rs, loss='mykd'), "loss 'mykd', which has no OBJECTIVES entry"),
        'an option of another type': (dict(rs, options=dict(rounds=float, sampler=str)), 'needs a Config field of that type'),
        'an option every cache records': (dict(rs, options=dict(rounds=int, sampler=str, seed=int)), 'every cache records seed already'),
        'an unknown dtype': (dict(rs, files=dict(rs['files'], counts=('uint9', 'entry', [guardrails.at_least_1]))), "dtype 'uint9'"),
        'checks that are no list': (dict(rs, files=dict(rs['files'], counts=('uint8', 'entry', guardrails.at_least_1))), "file 'counts' has no value checks"),
        'a width from a text option': (dict(rs, files=dict(rs['files'], lengths=('uint8', 'sampler', [guardrails.at_least_1]))), "per='sampler'"),
        'numpy, not tensors': (edited(lambda out: {k: v.numpy() for k, v in out.items()}), 'as tensors'),
        'a file one value short': (edited(lambda out: dict(out, counts=out['counts'][:-1])), "values of 'counts' for 4 sequences"),
        'ids its dtype cannot hold': (edited(lambda out: dict(out, ids=out['ids'] - 1)), "values of 'ids' that its dtype uint16 cannot hold"),
        'values its checks refuse': (edited(lambda out: dict(out, counts=out['counts'] * 2)), "sums_to_rounds of 'counts'"),
    }


@pytest.mark.parametrize('case', list(fork_mistakes()))
def test_a_forks_mistake_is_named(case, tmp_path, data, teacher, monkeypatch):
    # whatever a fork gets wrong in its entry or its target stops the run with a message that names it,
    # before a step of data is written
    entry, words = fork_mistakes()[case]
    monkeypatch.setitem(rskd.FORMATS, 'bad', entry)
    with pytest.raises(RuntimeError, match=re.escape(words)):
        run(*cache_args(data, teacher, tmp_path / 'c', '--method', 'bad', '--max_seqs', 8))
    meta = tmp_path / 'c' / 'meta.json'
    assert not meta.exists() or json.load(open(meta))['seqs_done'] == 0


def test_verify_a_cache_with_nothing_committed(tmp_path, data, teacher, capsys):
    # a cache stopped before its first commit: verify says so, and finds nothing damaged
    with pytest.raises(SystemExit):  # (a proposal that underflows stops it before its first batch)
        run(*cache_args(data, teacher, tmp_path / 'c', '--method', 'is', '--proposal_temperature', 60))
    capsys.readouterr()
    run('--mode', 'verify', '--data_dir', data, '--cache_dir', tmp_path / 'c', *TINY)
    assert 'is intact: 0 sequences so far (incomplete)' in capsys.readouterr().out


def test_bench_tables_print_every_row(tmp_path, data, caches, monkeypatch, capsys):
    # the script behind RESULTS.md's tables, on fake runs: two seeds of each row, and their caches
    import bench
    for cache in {row[3] for row in bench.ROWS if row[3]}:
        shutil.copytree(caches['topk' if cache == 'cache-topk' else 'is' if 'is' in cache else 'rs'], cache)
    os.makedirs('out')
    guardrails.write_json(dict(step_ratio_vs_ce={m: 1.0 + i / 10 for i, m in enumerate(bench.step_methods())}), 'out/bench.json')
    bins = [[10, (b + 0.5) / 15, 0.5] for b in range(15)]
    for i, (_, run_name, *_) in enumerate(bench.ROWS):
        for seed in (1, 2):
            os.makedirs(f'out-{run_name}-{seed}')
            rec = dict(iter=200, val_loss=3.0 + i + seed / 100, ece=0.02, kl_teacher=0.1, spec_accept=0.9,
                       reliability=bins)
            open(f'out-{run_name}-{seed}/metrics.jsonl', 'w').write(guardrails.dumps(dict(rec, iter=0)) + '\n' + guardrails.dumps(rec) + '\n')
    bench.print_tables()
    out = capsys.readouterr().out
    assert '| CE | 3.015 ± 0.005 | 2.00 ± 0.00 | 0.100 ± 0.000 | 90.0 ± 0.0 | 1.00 | - |' in out
    assert '| Full KD | 8.015 ± 0.005 |' in out and 'unique)' in out and '| RS-KD, 150 rounds | 15.015 ± 0.005 |' in out
    assert out.count('\n| 0.') == 5  # the five merged confidence bins
    shutil.rmtree('out-naive-2')  # a row whose runs are not all there is left out, and said to be
    bench.print_tables()
    out = capsys.readouterr().out
    assert 'left out: Top-K 12 + naive fix' in out and '| Top-K 12 + naive fix |' not in out
    rec = dict(iter=2, val_loss=3.0, ece=0.02, reliability=bins)  # a CE run without a teacher: no KL
    for seed in (1, 2):
        open(f'out-ce-{seed}/metrics.jsonl', 'w').write(guardrails.dumps(rec) + '\n')
    bench.print_tables()
    assert '| CE | 3.000 ± 0.000 | 2.00 ± 0.00 | - | - |' in capsys.readouterr().out
    if importlib.util.find_spec('matplotlib'):  # (optional, as transformers is)
        bench.plot()
        assert all(os.path.getsize(f'plots/{f}.png') > 1000 for f in ('reliability', 'val_loss'))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, 'matplotlib', None)  # import matplotlib now raises ImportError
        with pytest.raises(SystemExit):
            bench.plot()
        assert 'pip install matplotlib' in capsys.readouterr().err
    open('out-ce-2/metrics.jsonl', 'w').close()  # a run stopped before its first eval
    with pytest.raises(SystemExit):
        bench.print_tables()
    assert 'out-ce-2/metrics.jsonl holds no eval yet' in capsys.readouterr().err


def test_bench_rounds_sweep(tmp_path, data, teacher):
    import bench
    cfg = rskd.Config(data_dir=data, teacher=teacher, out_dir=str(tmp_path), block_size=16, batch_size=4,
                      n_layer=1, n_head=2, n_embd=16, device='cpu', seed=3)
    bench.run_rounds(cfg, guardrails.setup(cfg), sweep=(3, 20), n_seqs=8)
    res = json.load(open(tmp_path / 'rounds.json'))
    multi, syst = (np.array(res['distinct_per_position'][s]) for s in ('multinomial', 'systematic'))
    assert len(multi) == len(syst) == 255 and multi[0] == syst[0] == 1  # one draw, one id
    assert (multi <= np.arange(1, 256)).all() and (multi <= V).all()
    assert multi[0] < multi[4] < multi[49] < multi[254]  # more rounds, more distinct ids
    assert syst[49] > multi[49]  # evenly spaced points hit more distinct ids than independent ones
    assert {'multinomial3', 'systematic3', 'multinomial20', 'systematic20'} <= set(res['grad_angle_deg'])
    assert res['unique_per_position']['multinomial3'] <= 3


def test_bench_storage_sweep(tmp_path, data, teacher, capsys):
    import bench
    bench.main(['storage', '--data_dir', data, '--teacher', teacher, '--out_dir', str(tmp_path), *TINY])
    res = json.load(open(tmp_path / 'storage.json'))
    ragged = [m for m, f in rskd.FORMATS.items() if f['ragged']]
    assert [(r['method'], r['rounds']) for r in res['rows']] == [(m, N) for N in (12, 50, 150) for m in ragged]
    for r in res['rows']:
        assert r['bytes_per_entry'] < r['plain_bytes_per_entry'] and r['cache_tok_s'] > 0
        assert 0 < r['cache_speed_vs_plain'] < 10 and 0 < r['step_vs_plain'] < 10
    assert capsys.readouterr().out.count('| rs | ') == 3


def test_the_gpu_check_runs_end_to_end_on_cpu(tmp_path, data):
    # the script whoever next has a GPU runs: its plumbing, at a tiny shape on CPU, without the CUDA tests,
    # in its own folder (the data it reads is OUT_DIR/data, not ./data)
    import bench
    out = tmp_path / 'check'
    shutil.copytree(data, out / 'data')
    cfg = rskd.Config(out_dir=str(out), device='cpu', seed=3)
    tiny = dict(n_layer=1, n_head=2, n_embd=16)
    bench.run_gpu_check(cfg, guardrails.setup(cfg), dict(tiny, block_size=16), tiny, seqs=16, batch=4, steps=2, tests=False)
    res = json.load(open(out / 'gpu_check.json'))
    assert 'cache complete' in res['cache']['last_line'] and 'tok/s' in res['student']['last_line']
    assert set(res['bench']['cache_ratio_vs_fwd']) >= set(rskd.FORMATS) and res['bench']['teacher_fwd_tok_s'] > 0
    assert json.load(open(out / 'gpu-cache' / 'meta.json'))['num_seqs'] == 16
    assert not os.path.exists(tmp_path / 'data')


@pytest.mark.parametrize('sub', ['', 'rounds', 'storage'])
def test_the_bench_scripts_refuse_a_batch_bigger_than_the_data(sub, tmp_path, data, teacher, capsys):
    # every bench reads --max_seqs sequences at most, and needs one batch of them; the GPU check needs CUDA
    import bench
    args = [*([sub] if sub else []), '--data_dir', data, '--teacher', teacher, '--out_dir', str(tmp_path), *TINY]
    for extra, said in ((['--max_seqs', 3], 'is more than the 3 sequences'), (['--batch_size', 10 ** 6], 'is more than')):
        with pytest.raises(SystemExit) as e:
            bench.main([str(a) for a in (*args, *extra)])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith('error: --batch_size') and said in err and err.count('\n') == 1, err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.main(['gpu', '--out_dir', str(tmp_path)])
        assert capsys.readouterr().err.startswith('error: bench.py gpu is the GPU check: it needs CUDA')


# ----------------------------------------------------------------------------- scale out


def torchrun(nproc, *argv, script=RSKD_PY, ok=True):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', str(script),
           *[str(a) for a in argv]]
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env(OMP_NUM_THREADS='1'))
    assert (p.returncode == 0) == ok, p.stdout + p.stderr
    return p


def test_ddp_cache_killed_and_resumed_equals_single_process(tmp_path, data, teacher, caches):
    d = tmp_path / 'rs'
    dying = tmp_path / 'dying.py'  # rank 0 is SIGKILLed just before it records the 2nd round in meta.json
    dying.write_text(kill_script('guardrails.write_json', 3, "rskd.main(sys.argv[1:])"))
    torchrun(2, *cache_args(data, teacher, d), script=dying, ok=False)
    meta = json.load(open(d / 'meta.json'))
    assert not meta['complete'] and meta['seqs_done'] == 2 * 4  # one round of 2 ranks x batch 4
    no_pickles = tmp_path / 'no_pickles.py'  # resumed: the ranks' parts and the vocab order move as tensors
    no_pickles.write_text(f"import sys\nsys.path.insert(0, {HERE!r})\nimport torch.distributed as dist\n"
                          f"def refused(*a, **k):\n    raise AssertionError('an object pickled between ranks')\n"
                          f"for name in [n for n in dir(dist) if n.endswith(('_object', '_object_list'))]:\n"
                          f"    setattr(dist, name, refused)\nimport rskd\nrskd.main(sys.argv[1:])\n")
    torchrun(2, *cache_args(data, teacher, d), script=no_pickles)
    assert files_of(d) == files_of(caches['rs'])


def test_ddp_cache_sigterm_exits_143_and_resumes(tmp_path, data, teacher, caches):
    d = tmp_path / 'rs'
    slow = tmp_path / 'slow.py'  # each batch takes a while, so that the signal lands mid-cache
    slow.write_text(f"import sys, time\nsys.path.insert(0, {HERE!r})\nimport rskd\nreal = rskd.cache_batch\n"
                    f"def batch(*a):\n    time.sleep(0.3)\n    return real(*a)\nrskd.cache_batch = batch\n"
                    f"rskd.main(sys.argv[1:])\n")
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(slow),
           *map(str, cache_args(data, teacher, d, '--commit_seconds', 0))]
    p = subprocess.Popen(cmd, env=child_env(OMP_NUM_THREADS='1'), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    for _ in range(1200):
        if (d / 'meta.json').exists() and json.load(open(d / 'meta.json'))['seqs_done']:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    # (torchrun's own SignalException traceback is its way; the ranks print one line each, no traceback)
    assert p.returncode != 0 and 'interrupted (SIGTERM)' in out
    assert all(f'{f}", line' not in out for f in ('rskd.py', 'guardrails.py', 'slow.py')), out
    assert not json.load(open(d / 'meta.json'))['complete']
    torchrun(2, *cache_args(data, teacher, d))  # resumed
    assert files_of(d) == files_of(caches['rs'])


@pytest.mark.parametrize('mode', ['cache', 'train'])
def test_ddp_a_rank_that_fails_leaves_the_others_one_line(mode, tmp_path, data, teacher, caches):
    # rank 0 stops (a full disk): caching, at its 2nd batch, rank 1 left waiting in the gather; training, at
    # its 2nd checkpoint, rank 1 left in DDP's gradient all_reduce inside the backward. Rank 1 says so in
    # one line, not gloo's traceback
    target, args = ('rskd.cache_batch', cache_args(data, teacher, tmp_path / 'c')) if mode == 'cache' else (
        'rskd.gr.save_checkpoint', ['--mode', 'train', '--data_dir', data, '--cache_dir', caches['rs'], *TINY,
                            '--max_iters', 6, '--eval_interval', 2, '--out_dir', tmp_path / 'o'])
    dying = tmp_path / 'dying.py'
    dying.write_text(f"import errno, os, sys\nsys.path.insert(0, {HERE!r})\nimport rskd\nreal, calls = {target}, [0]\n"
                     f"def dying(*a, **k):\n    calls[0] += 1\n    if os.environ['RANK'] == '0' and calls[0] == 2:\n"
                     f"        raise OSError(errno.ENOSPC, 'No space left on device')\n    return real(*a, **k)\n"
                     f"{target} = dying\nrskd.main(sys.argv[1:])\n")
    out = torchrun(2, *args, script=dying, ok=False)
    out = out.stdout + out.stderr
    assert 'error: No space left on device' in out, out
    assert '[rank1]: Traceback' not in out and '[rank0]: Traceback' not in out, out
    if 'rank 1: a collective between the ranks failed' not in out:  # (or torchrun stopped it first)
        assert 'rank : 1' in out and 'SIGTERM' in out, out


def test_ddp_training_and_resume_match_single_process(tmp_path, data, caches):
    common = ['--mode', 'train', '--data_dir', data, '--cache_dir', caches['rs'], *TINY, '--eval_interval', 2,
              '--lr_decay_iters', 4]
    run(*common, '--max_iters', 4, '--out_dir', tmp_path / 'one', '--gradient_accumulation_steps', 2)
    # 2 ranks (0, as by default: one micro-step each, the same global batch), stopped after 2 steps, resumed
    torchrun(2, *common, '--max_iters', 2, '--out_dir', tmp_path / 'two', '--gradient_accumulation_steps', 0)
    torchrun(2, *common, '--max_iters', 4, '--out_dir', tmp_path / 'two', '--resume', 'true')
    assert guardrails.load_checkpoint(str(tmp_path / 'two' / 'ckpt.pt'))['config']['gradient_accumulation_steps'] == 2
    one, two = final_weights(tmp_path / 'one'), final_weights(tmp_path / 'two')
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
    m1, m2 = ([json.loads(line) for line in open(tmp_path / d / 'metrics.jsonl')] for d in ('one', 'two'))
    assert [m['iter'] for m in m1] == [m['iter'] for m in m2] == [0, 2, 4]
    assert abs(m1[-1]['val_loss'] - m2[-1]['val_loss']) < 1e-4


def test_ddp_one_all_reduce_and_one_host_read_per_step(tmp_path, data, caches):
    # under torchrun: 4 more steps, 4 more all_reduces (the loss and every rank's signals together) and
    # 4 more host reads outside the batch fetch, on each rank
    script = tmp_path / 'counting.py'
    script.write_text(f"""import os, sys, torch
sys.path.insert(0, {HERE!r})
import rskd, test_rskd
from torch import distributed as dist
reduces, reads = [0], []
real = dist.all_reduce
def counted(*a, **k):
    reduces[0] += 1
    return real(*a, **k)
dist.all_reduce = counted
class Patch:
    def setattr(self, obj, name, value):
        setattr(obj, name, value)
test_rskd.count_host_reads(Patch(), reads)
rskd.main(sys.argv[1:])
with open(sys.argv[sys.argv.index('--out_dir') + 1] + '/counts' + os.environ['RANK'], 'w') as f:
    f.write(f'{{reduces[0]}} {{len(reads)}}')
""")
    counts = []
    for steps in (2, 6):  # each rank writes its counts to a file of its own (stdout is shared by the ranks)
        torchrun(2, '--mode', 'train', '--data_dir', data, '--cache_dir', caches['rs'], *TINY, '--max_iters', steps,
                 '--eval_interval', 100, '--log_interval', 100, '--out_dir', tmp_path / f'o{steps}', script=script)
        counts.append([[int(n) for n in (tmp_path / f'o{steps}' / f'counts{r}').read_text().split()] for r in range(2)])
    for rank in range(2):
        assert (counts[1][rank][0] - counts[0][rank][0], counts[1][rank][1] - counts[0][rank][1]) == (4, 4), counts


def test_hugging_face_teacher(tmp_path, data, capsys):
    # CI installs transformers so that this runs there; elsewhere it is optional
    transformers = __import__('transformers') if os.environ.get('CI') else pytest.importorskip('transformers')
    torch.manual_seed(0)
    config = dict(n_positions=32, n_embd=16, n_head=2, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_layer=2, **config)).eval()
    hf.save_pretrained(tmp_path / 'hf')
    ours = GPT.from_pretrained(str(tmp_path / 'hf')).eval()
    idx = torch.randint(0, V, (2, 32))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max() < 1e-4
    run(*cache_args(data, tmp_path / 'hf', tmp_path / 'cache'))
    meta = json.load(open(tmp_path / 'cache' / 'meta.json'))
    assert meta['complete'] and meta['teacher']['name'] == str(tmp_path / 'hf') and len(meta['teacher']['sha256']) == 64
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_layer=1, **config)).save_pretrained(tmp_path / 'hf100')
    err = fail(capsys, *cache_args(data, tmp_path / 'hf100', tmp_path / 'c100'))
    assert 'vocabulary of 100 tokens, the data has 97' in err


def test_missing_transformers_says_how_to_install(tmp_path, data, monkeypatch, capsys):
    (tmp_path / 'hfdir').mkdir()
    (tmp_path / 'hfdir' / 'config.json').write_text('{"model_type": "gpt2"}')
    monkeypatch.setitem(sys.modules, 'transformers', None)  # import transformers now raises ImportError
    for name in (tmp_path / 'hfdir', 'gpt2-xl'):
        assert 'pip install transformers' in fail(capsys, *cache_args(data, name, tmp_path / 'c'))

# ----------------------------------------------------------------------------- reliability


def edit_meta(path, resign=True, **changes):
    """meta.json edited; resign: with a checksum that matches, as a buggy writer would leave it."""
    meta = json.load(open(path))
    meta.pop('crc32')
    meta.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del meta[k]
    open(path, 'w').write(guardrails.dumps(meta) if resign else json.dumps(meta))


def bad_inputs(tmp, data, teacher, caches):
    """name -> (a function that sets the case up in the fresh folder tmp and returns argv, expected words)."""
    train = ['--mode', 'train', '--data_dir', data, '--out_dir', f'{tmp}/out', *TINY, '--max_iters', 2]
    cache = cache_args(data, teacher, f'{tmp}/c')

    def data_with(edit):  # a copy of the data, edited
        shutil.copytree(data, f'{tmp}/d')
        edit(f'{tmp}/d')
        return f'{tmp}/d'

    def cache_with(edit, src='rs'):  # a copy of a cache, edited
        shutil.copytree(caches[src], f'{tmp}/cache')
        edit(f'{tmp}/cache')
        return f'{tmp}/cache'

    def set_token(d, value, fix_checksum=True):  # one token of train.bin changed, meta.json's crc too
        np.memmap(f'{d}/train.bin', np.uint16, 'r+')[5] = value
        if fix_checksum:
            edit_meta(f'{d}/meta.json', train_crc32=zlib.crc32(open(f'{d}/train.bin', 'rb').read()))

    def garbage():
        open(f'{tmp}/bad.pt', 'wb').write(b'not a checkpoint')
        return f'{tmp}/bad.pt'

    def a_file():
        open(f'{tmp}/a_file', 'w').write('not a folder')
        return f'{tmp}/a_file'

    def folder_instead(d, name):  # a file of d replaced by a folder
        os.remove(f'{d}/{name}')
        os.makedirs(f'{d}/{name}')

    def locked(folder):  # another run holds the folder (its lock is held by this test process)
        os.makedirs(folder, exist_ok=True)
        held = open(f'{folder}/.lock', 'a+')
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write('4242')
        held.flush()
        LOCKS.append(held)
        return folder
    nan_probs = lambda d: np.full(os.path.getsize(f'{d}/probs.bin') // 2, np.nan, np.float16).tofile(f'{d}/probs.bin')
    return {
        'missing data_dir': (lambda: ['--mode', 'train', '--data_dir', f'{tmp}/nope'], 'meta.json not found'),
        'missing train.bin': (lambda: ['--mode', 'train', '--data_dir', data_with(lambda d: os.remove(f'{d}/train.bin'))], 'train.bin not found'),
        'missing val.bin': (lambda: [*train, '--cache_dir', caches['rs'], '--data_dir', data_with(lambda d: os.remove(f'{d}/val.bin'))], 'val.bin not found'),
        'odd-sized .bin': (lambda: ['--mode', 'train', '--data_dir', data_with(lambda d: open(f'{d}/train.bin', 'ab').write(b'x'))], 'uint16 tokens'),
        'token >= vocab': (lambda: ['--mode', 'train', '--data_dir', data_with(lambda d: set_token(d, 200))], 'token ids >= vocab_size'),
        'corpus < one block': (lambda: ['--mode', 'train', '--data_dir', write_data(f'{tmp}/d', n_train=10)], 'fewer than one block'),
        'block larger than data': (lambda: [*train, '--block_size', 30000], 'fewer than one block'),
        'batch larger than data': (lambda: [*train, '--cache_dir', caches['rs'], '--batch_size', 5000], 'one step takes 5000 sequences'),
        'data meta missing field': (lambda: ['--mode', 'train', '--data_dir', data_with(lambda d: edit_meta(f'{d}/meta.json', eot=None))], "missing fields ['eot']"),
        'data meta wrong type': (lambda: ['--mode', 'train', '--data_dir', data_with(lambda d: edit_meta(f'{d}/meta.json', train_tokens='20000'))], "'train_tokens' should be int"),
        'missing cache': (lambda: [*train, '--cache_dir', f'{tmp}/none'], 'no cache in'),
        'incomplete cache': (lambda: [*train, '--cache_dir', cache_with(lambda d: edit_meta(f'{d}/meta.json', complete=False, seqs_done=8,
                                                                     entries=int(np.fromfile(f'{d}/seq_offsets.bin', np.uint64)[8])))], 'incomplete (8/'),
        'cache of other data': (lambda: [*train, '--cache_dir', caches['rs'], '--data_dir', data_with(lambda d: set_token(d, 7))], 'other training data'),
        'cache of other block_size': (lambda: [*train, '--cache_dir', caches['rs'], '--block_size', 8], 'pass --block_size 16'),
        'cache of other vocab': (lambda: [*train, '--cache_dir', caches['rs'], '--data_dir', data_with(lambda d: edit_meta(f'{d}/meta.json', vocab_size=101))], 'over 97 tokens, not train over 101'),
        'cache of other method': (lambda: [*train, '--cache_dir', caches['rs'], '--loss', 'topk'], 'is a rs cache'),
        'cache meta unexpected field': (lambda: [*train, '--cache_dir', cache_with(lambda d: edit_meta(f'{d}/meta.json', extra=1))], "unexpected fields ['extra']"),
        'cache meta missing field': (lambda: [*train, '--cache_dir', cache_with(lambda d: edit_meta(f'{d}/meta.json', seed=None))], "missing fields ['seed']"),
        'truncated cache file': (lambda: [*train, '--cache_dir', cache_with(lambda d: os.truncate(f'{d}/ids.bin', os.path.getsize(f'{d}/ids.bin') - 2), 'rs-plain')], 'does not have the size'),
        'truncated block file': (lambda: [*train, '--cache_dir', cache_with(lambda d: os.truncate(f'{d}/blocks.bin', os.path.getsize(f'{d}/blocks.bin') - 1))], 'does not have the size'),
        'missing teacher': (lambda: [*train, '--loss', 'fullkd', '--teacher', f'{tmp}/none.pt'], 'none.pt not found'),
        'corrupt teacher': (lambda: [*train, '--loss', 'fullkd', '--teacher', garbage()], 'not a valid rskd checkpoint'),
        'teacher of other vocab': (lambda: [*cache, '--data_dir', data_with(lambda d: edit_meta(f'{d}/meta.json', vocab_size=101))], 'vocabulary of 97 tokens, the data has 101'),
        'teacher with shorter block_size': (lambda: [*cache, '--block_size', 32], 'shorter than --block_size 32'),
        'rounds 0': (lambda: [*cache, '--rounds', 0], '--rounds must be 1..255'),
        'rounds 256': (lambda: [*cache, '--rounds', 256], '--rounds must be 1..255'),
        'k 0': (lambda: [*cache, '--method', 'topk', '--k', 0], '--k must be at least 1'),
        'k > vocab': (lambda: [*cache, '--method', 'topk', '--k', 98], 'must be 1 to the vocabulary size 97'),
        'unknown loss': (lambda: [*train, '--loss', 'mse'], "invalid choice: 'mse'"),
        'unknown method': (lambda: [*cache, '--method', 'gumbel'], "invalid choice: 'gumbel'"),
        'unknown mode': (lambda: ['--mode', 'serve'], "invalid choice: 'serve'"),
        'non-finite loss': (lambda: [*train, '--cache_dir', caches['rs'], '--alpha', 1e38], 'the loss became inf'),
        'NaN in a cache': (lambda: [*train, '--loss', 'topk', '--cache_dir', cache_with(nan_probs, 'topk-plain')], 'is damaged: sequence '),
        'unknown device': (lambda: [*train, '--device', 'tpu'], '--device must be auto, cpu, cuda or cuda:N'),
        'missing GPU': (lambda: [*train, '--device', 'cuda:99'], 'CUDA GPUs: use --device cpu'),
        'tail without topk': (lambda: [*train, '--cache_dir', caches['rs'], '--topk_tail', 'ghost'], 'changes only --loss topk, not --loss rskd'),
        'negative grad_clip': (lambda: [*train, '--grad_clip', -1], '--grad_clip must be at least 0, got -1'),
        'negative accumulation': (lambda: [*train, '--gradient_accumulation_steps', -1], 'at least 1 (or 0: one per rank)'),
        'cache meta of unknown method': (lambda: [*train, '--cache_dir', cache_with(lambda d: edit_meta(f'{d}/meta.json', method='gumbel'))], "has method 'gumbel'"),
        'teacher folder, not file': (lambda: [*train, '--loss', 'fullkd', '--teacher', os.path.dirname(teacher)], 'folder without config.json'),
        'fullkd teacher with shorter block_size': (lambda: [*train, '--loss', 'fullkd', '--teacher', teacher, '--block_size', 32], 'shorter than --block_size 32'),
        'bench student of other block_size': (lambda: (run(*train, '--loss', 'ce', '--teacher', 'none', '--block_size', 8),
                                                        ['--mode', 'bench', '--data_dir', data, '--teacher', teacher, '--out_dir', f'{tmp}/out', *TINY])[1],
                                              'is a student for vocab 97 and block_size 8'),
        'resume without checkpoint': (lambda: [*train, '--resume', 'true'], 'ckpt.pt not found'),
        'out_dir is a file': (lambda: [*train, '--out_dir', a_file()], f"--out_dir '{tmp}/a_file' is not a folder"),
        'cache_dir is a file': (lambda: cache_args(data, teacher, a_file()), f"--cache_dir '{tmp}/a_file' is not a folder"),
        'data_dir is a file': (lambda: ['--mode', 'train', '--data_dir', a_file()], 'is not a folder'),
        'train.bin is a folder': (lambda: ['--mode', 'train', '--data_dir', data_with(lambda d: folder_instead(d, 'train.bin'))], 'train.bin is a folder, not a file'),
        'cache meta.json is a folder': (lambda: [*train, '--cache_dir', cache_with(lambda d: folder_instead(d, 'meta.json'))], 'meta.json is a folder, not a file'),
        'ckpt.pt is a folder': (lambda: (os.makedirs(f'{tmp}/out/ckpt.pt'), [*train, '--resume', 'true'])[1], 'ckpt.pt is a folder, not a file'),
        'metrics.jsonl is a folder': (lambda: (os.makedirs(f'{tmp}/out/metrics.jsonl'), [*train, '--cache_dir', caches['rs']])[1], 'Is a directory: '),
        'nan learning_rate': (lambda: [*train, '--learning_rate', 'nan'], '--learning_rate must be a finite number, got nan'),
        'inf alpha': (lambda: [*train, '--alpha', 'inf'], '--alpha must be a finite number, got inf'),
        'nan proposal_temperature': (lambda: [*cache, '--method', 'is', '--proposal_temperature', 'nan'], '--proposal_temperature must be a finite number'),
        'zero proposal_temperature': (lambda: [*cache, '--method', 'is', '--proposal_temperature', 0], '--proposal_temperature must be a positive number'),
        'tau without --method is': (lambda: [*cache, '--proposal_temperature', 0.8], '--proposal_temperature is an option of --method is, not rs'),
        'k for an rs cache': (lambda: [*cache, '--k', 4], '--k is an option of --method topk, not rs'),
        'tau that underflows': (lambda: [*cache, '--method', 'is', '--proposal_temperature', 60], 'has no finite mass'),
        'cache meta with a list for method': (lambda: [*train, '--cache_dir', cache_with(lambda d: edit_meta(f'{d}/meta.json', method=['rs']))], "has method ['rs']"),
        'negative seed': (lambda: [*train, '--seed', -1], '--seed must be between 0 and 2**64'),
        'huge seed': (lambda: [*train, '--seed', 10 ** 20], '--seed must be between 0 and 2**64'),
        'model too big': (lambda: [*train, '--cache_dir', caches['rs'], '--n_layer', 200, '--n_embd', 16384], 'needs about'),
        'damaged train.bin': (lambda: ['--mode', 'train', '--data_dir', data_with(lambda d: set_token(d, 7, fix_checksum=False))], 'does not match the checksum'),
        'data meta without checksums': (lambda: ['--mode', 'train', '--data_dir', data_with(lambda d: edit_meta(f'{d}/meta.json', train_crc32=None, val_crc32=None))], "missing fields ['train_crc32', 'val_crc32']"),
        'version-1 cache': (lambda: [*train, '--cache_dir', cache_with(lambda d: edit_meta(f'{d}/meta.json', version=2))], 'holds no cache of this version of rskd'),
        'cache meta with impossible values': (lambda: [*train, '--cache_dir', cache_with(lambda d: edit_meta(f'{d}/meta.json', False, rounds=0))], 'does not match its checksum'),
        'out_dir in use': (lambda: [*train, '--cache_dir', caches['rs'], '--out_dir', locked(f'{tmp}/out')], 'is in use by another rskd run (process 4242)'),
        'cache_dir in use': (lambda: cache_args(data, teacher, locked(f'{tmp}/c')), 'is in use by another rskd run (process 4242)'),
        'resume on other data': (lambda: (run(*train, '--loss', 'ce', '--teacher', 'none'), [*train, '--resume', 'true', '--data_dir', write_data(f'{tmp}/other', seed=1)])[1],
                                 'was trained with other data'),
        'cache meta with impossible entries': (lambda: [*train, '--cache_dir', cache_with(lambda d: edit_meta(f'{d}/meta.json', False, entries=-5))], 'does not match its checksum'),
        'verify without its split file': (lambda: ['--mode', 'verify', '--cache_dir', caches['rs'], *TINY[:-2], '--data_dir', data_with(lambda d: os.remove(f'{d}/train.bin'))], 'train.bin not found'),
        'empty out_dir': (lambda: [*train, '--out_dir', ''], "--out_dir '' is not a folder"),
        'out_dir a dangling link': (lambda: (os.symlink(f'{tmp}/nowhere', f'{tmp}/link'), [*train, '--out_dir', f'{tmp}/link'])[1],
                                    'is not a folder'),
        'cache_dir is the data folder': (lambda: [*train, '--cache_dir', data], 'holds no cache of this version of rskd: pass another'),
        'damaged data meta': (lambda: ['--mode', 'train', '--data_dir', data_with(lambda d: edit_meta(f'{d}/meta.json', False, val_docs=2))],
                              'meta.json does not match its checksum'),
        'checkpoint without optimizer state': (lambda: (run(*train, '--loss', 'ce', '--teacher', 'none'),
                                                        resigned(f'{tmp}/out/ckpt.pt', lambda c: c.pop('optimizer')),
                                                        [*train, '--loss', 'ce', '--resume', 'true'])[2], 'out/ckpt.pt holds a model of another'),
        'resume with another batch_size': (lambda: (run(*train, '--loss', 'ce', '--teacher', 'none'), [*train, '--resume', 'true', '--batch_size', 8])[1],
                                           'a resumed run keeps its batch_size'),
    }


EDITED_META = {  # meta.json values that no run writes, re-checksummed, as a buggy writer or a hand edit leaves them
    'cache': [dict(rounds=0), dict(rounds=256), dict(entries=-5), dict(num_seqs=-1), dict(seqs_done=10 ** 6),
              dict(ids_dtype='float64'), dict(ids_dtype='nonsense'), dict(block_size=0), dict(vocab_size=0),
              dict(seed=-1), dict(data=dict(path='x', n_tokens=-3, sha256='0')), dict(block_bytes=-1)],
    'topk': [dict(k=0), dict(k=10 ** 9), dict(k=-2)],
    'data': [dict(train_tokens=-1), dict(vocab_size=0), dict(vocab_size=70000), dict(eot=-1), dict(eot=10 ** 6),
             dict(dtype='float32'), dict(val_docs=-2)],
}


@pytest.mark.parametrize('case', [(kind, i) for kind, edits in EDITED_META.items() for i in range(len(edits))])
@pytest.mark.parametrize('mode', ['train', 'verify', 'cache'])
def test_a_meta_with_values_no_run_writes_is_refused(case, mode, tmp_path, data, teacher, caches, capsys):
    # one rule for every file read back: its checksum, its fields' types, then their ranges; whichever run
    # reads it (training, verify, a resumed cache) stops with one line and touches nothing
    kind, i = case
    d = tmp_path / ('data' if kind == 'data' else 'cache')
    shutil.copytree(data if kind == 'data' else caches['topk' if kind == 'topk' else 'rs'], d)
    edit_meta(d / 'meta.json', **EDITED_META[kind][i])
    data_dir, cache_dir = (d, caches['rs']) if kind == 'data' else (data, d)
    if mode == 'cache' and kind != 'data':
        edit_meta(d / 'meta.json', complete=False)  # a resume reads it
    method = ['--method', 'topk', '--k', json.load(open(caches['topk'] + '/meta.json'))['k']] if kind == 'topk' else []
    argv = {'train': ['--mode', 'train', '--out_dir', tmp_path / 'o'], 'verify': ['--mode', 'verify'],
            'cache': ['--mode', 'cache', '--teacher', teacher, *method]}[mode]
    before = files_of(d)
    fail(capsys, *argv, '--data_dir', data_dir, '--cache_dir', cache_dir if mode != 'cache' or kind != 'data' else tmp_path / 'c',
         *TINY)
    assert files_of(d) == before


LOCKS = []  # the lock files that bad_inputs' 'in use' cases hold


@pytest.mark.parametrize('case', list(bad_inputs('', '', '', {})))
def test_bad_input_gives_one_clear_line(case, tmp_path, data, teacher, caches, capsys):
    setup, words = bad_inputs(str(tmp_path), data, teacher, caches)[case]
    argv = setup()
    before = {d: files_of(d) for d in (data, *caches.values(), os.path.dirname(teacher), tmp_path)}
    assert words in fail(capsys, *argv)
    after = {d: files_of(d) for d in before}
    # nothing of the user's was touched: every file there before is as it was
    assert all({k: after[d].get(k) for k in files} == files for d, files in before.items())
    for held in LOCKS:
        held.close()
    LOCKS.clear()
    if case == 'non-finite loss':  # the last good checkpoint (iter 0) is intact
        assert torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=True)['iter_num'] == 0


def test_bench_refuses_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('RANK', '0')
    import bench
    with pytest.raises(SystemExit):
        bench.main(['--data_dir', str(tmp_path / 'none'), '--out_dir', str(tmp_path)])
    assert 'not torchrun' in capsys.readouterr().err
    assert 'not torchrun' in fail(capsys, '--mode', 'verify', '--data_dir', tmp_path / 'none', '--cache_dir', tmp_path)


def test_existing_run_is_not_overwritten(tmp_path, data, caches, capsys):
    args = ['--mode', 'train', '--data_dir', data, '--cache_dir', caches['rs'], *TINY, '--max_iters', 2, '--out_dir', tmp_path]
    run(*args)
    before = files_of(tmp_path)
    assert 'already exists' in fail(capsys, *args)
    assert files_of(tmp_path) == before


def test_errors_have_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, RSKD_PY, '--mode', 'train', '--data_dir', str(tmp_path / 'nope')],
                       capture_output=True, text=True, env=child_env())
    assert p.returncode == 1 and 'Traceback' not in p.stderr and p.stderr.count('\n') == 1, p.stderr


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('RSKD_EVIL_MARKER', '/tmp/rskd_evil')}",))


def test_checkpoint_carrying_code_is_refused(tmp_path, data, capsys, monkeypatch):
    marker = tmp_path / 'pwned'
    monkeypatch.setenv('RSKD_EVIL_MARKER', str(marker))
    torch.save({'model': Evil(), 'model_config': {}, 'config': {}, 'iter_num': 0}, tmp_path / 'evil.pt')
    assert 'not a valid rskd checkpoint' in fail(capsys, *cache_args(data, tmp_path / 'evil.pt', tmp_path / 'c'))
    assert not marker.exists()


def train_args(data, caches, out, *extra):
    return ['--mode', 'train', '--data_dir', data, '--cache_dir', caches['rs'], *TINY, '--out_dir', out,
            '--max_iters', 10, '--eval_interval', 4, *extra]


def test_ctrl_c_saves_and_resume_matches(tmp_path, data, caches):
    run(*train_args(data, caches, tmp_path / 'ref'))
    args = [str(a) for a in train_args(data, caches, tmp_path / 'int')]
    # Ctrl-C while drawing the 6th batch (prefetched during step 4): the step finishes, a checkpoint is
    # saved at iter 5, exit 130
    script = kill_script('rskd.draw_seqs', 6, f"rskd.main({args!r})", signal.SIGINT)
    p = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=child_env())
    assert p.returncode == 130 and p.stderr.splitlines()[-1] == (
        f"interrupted (SIGINT): saved {args[args.index('--out_dir') + 1]}/ckpt.pt at iter 5: resume with the "
        f"same command and --resume true"), p.stdout + p.stderr
    assert torch.load(tmp_path / 'int' / 'ckpt.pt', weights_only=True)['iter_num'] == 5
    run(*args, '--resume', 'true')
    ref, res = final_weights(tmp_path / 'ref'), final_weights(tmp_path / 'int')
    assert all(torch.equal(ref[k], res[k]) for k in ref)


def test_a_resume_at_a_step_that_was_not_evaluated_evaluates_it(tmp_path, data, caches):
    # Ctrl-C saves at iter 5, between evals (every 4); resumed with --max_iters 5, the run ends there,
    # and iter 5's eval, which the checkpoint does not hold, is made and recorded
    args = [str(a) for a in train_args(data, caches, tmp_path)]
    script = kill_script('rskd.draw_seqs', 6, f"rskd.main({args!r})", signal.SIGINT)
    p = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=child_env())
    assert p.returncode == 130, p.stdout + p.stderr
    run(*args, '--resume', 'true', '--max_iters', 5)
    lines = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    assert [m['iter'] for m in lines] == [0, 4, 5]
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 5 and [e['iter'] for e in ckpt['evals']] == [0, 4, 5]


def test_sigkill_while_saving_keeps_the_last_good_checkpoint(tmp_path, data, caches):
    run(*train_args(data, caches, tmp_path / 'ref'))
    args = [str(a) for a in train_args(data, caches, tmp_path / 'k')]
    # killed inside the 2nd checkpoint save (iter 4), after the temp file is written, before the rename
    # (the 1st rename is metrics.jsonl's, when the run starts)
    run_killed('os.replace', 3, f"import rskd\nrskd.main({args!r})")
    assert os.path.exists(tmp_path / 'k' / 'ckpt.pt.tmp')
    assert torch.load(tmp_path / 'k' / 'ckpt.pt', weights_only=True)['iter_num'] == 0
    run(*args, '--resume', 'true')
    ref, res = final_weights(tmp_path / 'ref'), final_weights(tmp_path / 'k')
    assert all(torch.equal(ref[k], res[k]) for k in ref)


def enospc_on_call(n, real):
    calls = [0]

    def f(*a, **k):
        calls[0] += 1
        if calls[0] >= n:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real(*a, **k)
    return f


def test_disk_full_while_checkpointing(tmp_path, data, caches, capsys, monkeypatch):
    saves = [0]

    def open_full(path, mode='r', *a, **k):  # the 2nd checkpoint's temp file lands on a full "disk"
        if str(path).endswith('ckpt.pt.tmp'):
            saves[0] += 1
            if saves[0] == 2:
                return open('/dev/full', mode)
        return open(path, mode, *a, **k)
    monkeypatch.setattr(guardrails, 'open', open_full, raising=False)
    assert 'No space left on device' in fail(capsys, *train_args(data, caches, tmp_path))
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['iter_num'] == 0  # the previous one, intact
    assert not os.path.exists(tmp_path / 'ckpt.pt.tmp')


def test_disk_full_while_caching_then_resume(tmp_path, data, teacher, caches, capsys, monkeypatch):
    args = cache_args(data, teacher, tmp_path / 'c')
    with monkeypatch.context() as m:
        m.setattr(os, 'fsync', enospc_on_call(10, os.fsync))  # the 2nd chunk's data files
        assert 'No space left on device' in fail(capsys, *args)  # the data files' fsync, not meta.json's
    meta = json.load(open(tmp_path / 'c' / 'meta.json'))
    assert not meta['complete'] and meta['seqs_done'] > 0
    run(*args)
    assert files_of(tmp_path / 'c') == files_of(caches['rs'])


def slow_commits(monkeypatch):
    """A slow disk: each fsync of the cache's commit thread takes 0.3 s. Returns the list that each such
    fsync adds 'fsync' to as it starts and 'synced' as it ends."""
    events, real = [], os.fsync

    def fsync(fd):
        if threading.current_thread().name == guardrails.COMMIT:
            events.append('fsync')
            time.sleep(0.3)
            events.append('synced')
        real(fd)
    monkeypatch.setattr(os, 'fsync', fsync)
    return events


def cache_exit_status(data, teacher, d):
    """The exit status of a cache run into d that ends by SystemExit (a signal, in the tests below)."""
    with pytest.raises(SystemExit) as e:
        run(*cache_args(data, teacher, d))
    return e.value.code


def test_cache_commit_runs_beside_the_next_batch(tmp_path, data, teacher, caches, capsys, monkeypatch):
    # a slow disk (each fsync 0.3 s) holds up no batch: the next batch's sampling starts while the commit is in
    # flight. A SIGTERM then, mid-commit: the commit ends, meta.json records it, the lock goes only after it
    events, real_batch = slow_commits(monkeypatch), rskd.cache_batch

    def batch(*a):
        events.append('batch')
        if events.count('batch') == 4:  # (the 3rd batch's commit in flight)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_batch(*a)
    monkeypatch.setattr(rskd, 'cache_batch', batch)
    d = tmp_path / 'c'
    assert cache_exit_status(data, teacher, d) == 128 + signal.SIGTERM
    assert all(t.name != guardrails.COMMIT for t in threading.enumerate())
    assert events[:events.index('synced')].count('batch') == 2  # the 2nd began before the 1st commit's fsync ended
    meta = json.load(open(d / 'meta.json'))
    assert meta['seqs_done'] == 3 * 4 and open(d / '.lock').read() == ''  # the 3 batches before the signal
    monkeypatch.undo()
    run(*cache_args(data, teacher, d))
    assert files_of(d) == files_of(caches['rs'])


@pytest.mark.parametrize('signals', [1, 2])
def test_a_signal_while_waiting_for_a_commit(signals, tmp_path, data, teacher, caches, capsys, monkeypatch):
    # SIGTERM while the main thread waits for the commit in flight (each fsync 0.3 s): that commit still ends
    # and meta.json records it before the exit and the lock's release, after one signal or two (on Python
    # < 3.13 a join that a signal interrupts gives up on the thread)
    slow_commits(monkeypatch)
    real_wait = guardrails.CacheWriter.wait

    def wait(self):
        if getattr(self, 'writing', None):
            for i in range(signals):
                threading.Timer(0.1 + 0.1 * i, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return real_wait(self)
    monkeypatch.setattr(guardrails.CacheWriter, 'wait', wait)
    d = tmp_path / 'c'
    assert cache_exit_status(data, teacher, d) == 128 + signal.SIGTERM and capsys.readouterr().err.count('\n') == 1
    assert all(t.name != guardrails.COMMIT for t in threading.enumerate())
    assert json.load(open(d / 'meta.json'))['seqs_done'] == 4 and open(d / '.lock').read() == ''
    monkeypatch.undo()
    run(*cache_args(data, teacher, d))
    assert files_of(d) == files_of(caches['rs'])


def test_a_second_signal_while_the_lock_waits_keeps_the_first(tmp_path, data, teacher, caches, capsys, monkeypatch):
    # SIGTERM during the 2nd batch, the 1st commit in flight (each fsync 0.3 s); a SIGINT while the folder lock
    # waits for that commit: the run exits as the SIGTERM said (143), once the commit has ended
    slow_commits(monkeypatch)
    real_batch = rskd.cache_batch

    def batch(*a):
        if any(t.name == guardrails.COMMIT for t in threading.enumerate()):
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
            os.kill(os.getpid(), signal.SIGTERM)
        return real_batch(*a)
    monkeypatch.setattr(rskd, 'cache_batch', batch)
    d = tmp_path / 'c'
    assert cache_exit_status(data, teacher, d) == 128 + signal.SIGTERM and 'interrupted (SIGTERM)' in capsys.readouterr().err
    assert json.load(open(d / 'meta.json'))['seqs_done'] == 4 and open(d / '.lock').read() == ''


def test_a_targets_files_may_come_in_any_order(tmp_path, data, teacher, caches, monkeypatch):
    # the writer goes by the entry's files, not by the order of the dict a target returns
    real = rskd.FORMATS['rs']['target']
    monkeypatch.setitem(rskd.FORMATS['rs'], 'target', lambda *a: dict(reversed(real(*a).items())))
    run(*cache_args(data, teacher, tmp_path / 'c', '--compress', 'false'))
    assert files_of(tmp_path / 'c') == files_of(caches['rs-plain'])


def cache_units(d):
    """name -> (numpy dtype, per) of each file of the cache in d, from its FORMATS entry."""
    return guardrails.cache_files(json.load(open(os.path.join(d, 'meta.json'))), rskd.FORMATS)


def affected_sequences(d, name, element):
    """The sequences whose checksum covers element `element` of d/name.bin."""
    meta = json.load(open(os.path.join(d, 'meta.json')))
    T, S, per = meta['block_size'], meta['num_seqs'], cache_units(d)[name][1]
    if per == 'crc':
        return {element}
    if per == 'sequence':  # offsets[j] ends sequence j-1 and starts sequence j
        return {s for s in (element - 1, element) if 0 <= s < S}
    if per in ('entry', 'byte'):
        offsets = np.fromfile(os.path.join(d, 'seq_offsets.bin'), np.uint64)
        return {int(np.searchsorted(offsets, element, side='right')) - 1}
    if per == 'vocab':  # every block is decoded with it
        return set(range(S))
    return {element // (T * guardrails.width(meta, per))}


def damage(path, dtype, element, kind):
    """One element of a cache file damaged in place: its bits flipped, zeroed, or set to an extreme."""
    a = np.memmap(path, dtype=dtype, mode='r+')
    before = a[element].copy()
    if kind == 'flip':
        a.view(np.uint8)[element * a.itemsize] ^= 0xFF
    elif kind == 'zero':
        a[element] = 0
        if before == 0:  # nothing to zero here: zero the next nonzero element instead
            element = int(np.flatnonzero(a)[0])
            a[element] = 0
    else:  # the largest integer, or a negative float (a value that no check lets through unseen)
        extreme = np.iinfo(a.dtype).max if a.dtype.kind in 'ui' else -7.0
        a[element] = extreme if before != extreme else 0
    a.flush()
    return element


@pytest.mark.parametrize('cache', storages())
def test_damaged_cache_is_caught_before_its_rows_are_used(cache, tmp_path, data, caches, capsys):
    # every file of the cache, damaged at its start, middle and end by a bit flip, zeroes or an extreme
    # value; training reads batches in order: the first batch holding a damaged sequence must stop the
    # run, the batches before it must pass. A compressed block's checksum is checked before it is
    # decompressed, so a damaged block never reaches the decoder
    src, method = caches[cache], cache.split('-')[0]
    units = cache_units(src)
    cfg = rskd.Config(data_dir=data, cache_dir=str(tmp_path / 'c'), block_size=16, device='cpu')
    env = guardrails.setup(cfg)
    tokens = rskd.load_split(cfg, 'train', env)[0]
    for name, (dtype, _) in units.items():
        n = os.path.getsize(os.path.join(src, f'{name}.bin')) // np.dtype(dtype).itemsize
        for element in (0, n // 2, n - 1):
            for kind in ('flip', 'zero', 'extreme'):
                shutil.rmtree(tmp_path / 'c', ignore_errors=True)
                shutil.copytree(src, tmp_path / 'c')
                if units[name][1] == 'sequence' and element == 0 and kind == 'zero':
                    element = 1  # (offsets[0] is 0 already)
                hit = damage(str(tmp_path / 'c' / f'{name}.bin'), dtype, element, kind)
                bad = affected_sequences(src, name, hit)
                _, reader = rskd.open_cache(cfg, rskd.FORMATS[method]['loss'], tokens, V, env)
                S = json.load(open(tmp_path / 'c' / 'meta.json'))['num_seqs']
                for lo in range(0, S, 64):
                    seqs = list(range(lo, min(lo + 64, S)))
                    if bad & set(seqs):
                        with pytest.raises(SystemExit):
                            reader(seqs)
                        err = capsys.readouterr().err
                        assert 'is damaged: sequence ' in err and str(min(bad & set(seqs))) in err, (name, kind, err)
                        break
                    reader(seqs)  # the batches before the damage pass
                else:
                    pytest.fail(f"{name}[{hit}] {kind}: not caught")


def buggy_writer(monkeypatch, edit):
    """The cache writer with a bug: edit(arrays) changes its first batch's values after they were
    checked, so that their checksums cover the bad values as they would any other."""
    real, calls = guardrails.CacheWriter.checked, []

    def checked(self, part, n):
        arrays = real(self, part, n)
        if not calls:
            edit(arrays)
        calls.append(n)
        return arrays
    monkeypatch.setattr(guardrails.CacheWriter, 'checked', checked)


@pytest.mark.parametrize('compress', ['true', 'false'])
def test_values_are_checked_even_where_a_checksum_matches(compress, tmp_path, data, teacher, capsys, monkeypatch):
    # a count of 0, in either storage, with a checksum that matches it: the value checks stop the run
    with monkeypatch.context() as m:
        buggy_writer(m, lambda arrays: arrays['counts'].__setitem__(0, 0))
        run(*cache_args(data, teacher, tmp_path / 'c', '--max_seqs', 16, '--compress', compress))
    cfg = rskd.Config(data_dir=data, cache_dir=str(tmp_path / 'c'), block_size=16, device='cpu', max_seqs=16)
    env = guardrails.setup(cfg)
    _, reader = rskd.open_cache(cfg, 'rskd', rskd.load_split(cfg, 'train', env, 16)[0], V, env)
    reader([1, 2])
    with pytest.raises(SystemExit):
        reader([3, 0])
    assert 'sequence 0 (' in capsys.readouterr().err


@pytest.mark.parametrize('cache', ['topk', 'topk-plain'])
def test_training_stops_at_the_first_batch_with_damaged_rows(cache, tmp_path, data, caches, capsys, monkeypatch):
    shutil.copytree(caches[cache], tmp_path / 'c')
    S, B = (20000 - 1) // 16, 4
    order = rskd.draw_seqs(S, 3, 0, S)  # the data order of seed 3 (TINY)
    victim = order[5 * B + 1]  # drawn in the 6th step (iter 5)
    if cache == 'topk':  # a byte inside its block
        start = np.fromfile(tmp_path / 'c' / 'seq_offsets.bin', np.uint64)[victim]
        damage(str(tmp_path / 'c' / 'blocks.bin'), 'uint8', int(start) + 9, 'flip')
    else:
        damage(str(tmp_path / 'c' / 'probs.bin'), 'float16', victim * 16 * 5 + 7, 'flip')
    steps = []
    real_step = torch.optim.AdamW.step

    def counting_step(self, *a, **k):
        steps.append(1)
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, 'step', counting_step)
    err = fail(capsys, '--mode', 'train', '--data_dir', data, '--cache_dir', tmp_path / 'c', *TINY, '--loss', 'topk',
               '--max_iters', 20, '--eval_interval', 4, '--out_dir', tmp_path / 'o')
    assert f'sequence {victim} (' in err
    # steps 0-3 updated the model; step 5's batch, which holds the damaged sequence, is read (prefetched)
    # while step 4 runs, before step 4's update: neither of them updated it
    assert len(steps) == 4
    assert torch.load(tmp_path / 'o' / 'ckpt.pt', weights_only=True)['iter_num'] == 4
    # a run that ends before that batch never reads it, not even to prefetch
    run('--mode', 'train', '--data_dir', data, '--cache_dir', tmp_path / 'c', *TINY, '--loss', 'topk',
        '--max_iters', 5, '--eval_interval', 5, '--out_dir', tmp_path / 'o5')
    assert torch.load(tmp_path / 'o5' / 'ckpt.pt', weights_only=True)['iter_num'] == 5


def test_wide_top_k_rows_are_read_whole():
    # a Top-K cache with k > 255 (the most entries a ragged position can have): its fixed-width rows
    # are read whole, not cut to 255 per position
    meta = dict(method='topk', block_size=2, k=300, vocab_size=50257, seqs_done=3, entries=1800, ids_dtype='uint16',
                compress=False)
    mm = dict(ids=np.arange(1800, dtype=np.uint16), probs=np.linspace(1, 0, 1800).astype(np.float16))
    rows = guardrails.read_rows(mm, meta, rskd.FORMATS, [0, 2])
    assert len(rows['ids']) == 2 * 2 * 300 and rows['ids'][600] == 1200


def test_verify_an_interrupted_cache(tmp_path, data, teacher, caches, capsys):
    # killed after its 3rd chunk's data was written but before meta.json recorded it: verify checks
    # the committed part, says the rest is resumable, and the resumed cache is the uninterrupted one
    d = str(tmp_path / 'c')
    args = cache_args(data, teacher, d)
    run_killed('guardrails.write_json', 4, f"rskd.main({[str(a) for a in args]!r})")
    capsys.readouterr()
    run('--mode', 'verify', '--data_dir', data, '--cache_dir', d, *TINY)
    out = capsys.readouterr().out
    assert f'{d} is intact: 8 sequences so far (incomplete)' in out
    run(*args)
    assert files_of(d) == files_of(caches['rs'])


def test_torchrun_environment_without_local_rank(tmp_path, data, caches, capsys, monkeypatch):
    monkeypatch.setenv('RANK', '0')
    assert 'LOCAL_RANK is not' in fail(capsys, '--mode', 'train', '--data_dir', data, '--cache_dir', caches['rs'],
                                       *TINY, '--out_dir', tmp_path)


def test_verify_lists_every_damaged_range(tmp_path, data, caches, capsys):
    run('--mode', 'verify', '--data_dir', data, '--cache_dir', caches['is'], *TINY)
    assert f"{caches['is']} is intact: 1,249 sequences" in capsys.readouterr().out
    shutil.copytree(caches['rs-plain'], tmp_path / 'c')
    damage(str(tmp_path / 'c' / 'lengths.bin'), 'uint8', 16 * 3 + 2, 'flip')  # sequence 3
    damage(str(tmp_path / 'c' / 'seq_offsets.bin'), 'uint64', 101, 'flip')  # sequences 100 and 101
    damage(str(tmp_path / 'c' / 'checksums.bin'), 'uint32', 1248, 'zero')  # the last one
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run('--mode', 'verify', '--data_dir', data, '--cache_dir', tmp_path / 'c', *TINY)
    out, err = capsys.readouterr()
    assert e.value.code == 1 and err.count('\n') == 1
    assert '4 of 1,249 sequences are damaged, in the 3 ranges above' in err
    assert [line for line in out.splitlines() if line.startswith('damaged')] == [
        'damaged: sequences 3-3 (positions 48-63)', 'damaged: sequences 100-101 (positions 1,600-1,631)',
        'damaged: sequences 1248-1248 (positions 19,968-19,983)']
    other = write_data(tmp_path / 'other', seed=1)  # the cache's data fingerprint: other tokens are refused
    assert 'made from other tokens' in fail(capsys, '--mode', 'verify', '--data_dir', other, '--cache_dir', caches['rs'], *TINY)


def test_a_folder_is_locked_while_a_run_writes_it(tmp_path, data, teacher, caches):
    # a cache run that sleeps in its 2nd chunk holds cache_dir; a second one is refused with its pid; killed,
    # it leaves the lock file behind, and that does not block the next run, which resumes
    d = str(tmp_path / 'c')
    args = cache_args(data, teacher, d)
    slow = (f"import time, sys\nsys.path.insert(0, {HERE!r})\nimport rskd\nreal, calls = rskd.cache_batch, [0]\n"
            f"def slow(*a, **k):\n    calls[0] += 1\n    if calls[0] == 2:\n        time.sleep(60)\n    return real(*a, **k)\n"
            f"rskd.cache_batch = slow\nrskd.main({[str(a) for a in args]!r})\n")
    first = subprocess.Popen([sys.executable, '-c', slow], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(600):
        if os.path.exists(f'{d}/meta.json') and json.load(open(f'{d}/meta.json'))['seqs_done']:
            break
        time.sleep(0.05)
    second = subprocess.run([sys.executable, RSKD_PY, *map(str, args)], capture_output=True, text=True, env=child_env())
    assert second.returncode == 1 and second.stderr.strip() == (
        f"error: {d} is in use by another rskd run (process {first.pid}): wait for it to finish, or use another folder")
    first.kill()
    first.wait()
    assert open(f'{d}/.lock').read() == str(first.pid)  # the stale lock file of a killed run
    run(*args)
    assert files_of(d) == files_of(caches['rs'])


@pytest.mark.parametrize('where', ['before the rename', 'after the rename', 'half a line written'])
def test_metrics_match_the_checkpoint_after_a_kill(tmp_path, data, caches, where):
    run(*train_args(data, caches, tmp_path / 'ref'))
    args = [str(a) for a in train_args(data, caches, tmp_path / 'k')]
    if where == 'before the rename':  # the 2nd checkpoint's (os.replace's 1st call is metrics.jsonl's)
        run_killed('os.replace', 3, f"rskd.main({args!r})")
    else:  # the 2nd checkpoint renamed, its metrics line not yet appended
        run_killed('guardrails.log_eval', 2, f"rskd.main({args!r})")
    if where == 'half a line written':
        open(tmp_path / 'k' / 'metrics.jsonl', 'a').write('{"iter": 4, "loss": "rs')
    run(*args, '--resume', 'true')
    ref, res = ([json.loads(line) for line in open(tmp_path / d / 'metrics.jsonl')] for d in ('ref', 'k'))
    assert [r['iter'] for r in res] == [r['iter'] for r in ref] == [0, 4, 8, 10]  # none lost, none twice
    assert [r['val_loss'] for r in res] == [r['val_loss'] for r in ref]


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_signal_under_torchrun_saves_and_resumes(sig, tmp_path, data, caches):
    # SIGINT or SIGTERM to the torchrun launcher mid-run (it passes it on to the ranks): the 2 ranks stop
    # at the same step, save and exit 128 + sig; torchrun exits non-zero. Resumed, the run ends where an
    # uninterrupted 2-process run does
    common = ['--mode', 'train', '--data_dir', data, '--cache_dir', caches['rs'], *TINY, '--eval_interval', 5,
              '--max_iters', 40]
    torchrun(2, *common, '--out_dir', tmp_path / 'ref')
    slow = tmp_path / 'slow.py'  # each step takes a while, so that the signal lands mid-run
    slow.write_text(f"import sys, time\nsys.path.insert(0, {HERE!r})\nimport rskd\nreal = rskd.draw_seqs\n"
                    f"def draw(*a):\n    time.sleep(0.1)\n    return real(*a)\nrskd.draw_seqs = draw\nrskd.main(sys.argv[1:])\n")
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(slow),
           *map(str, common), '--out_dir', str(tmp_path / 'int')]
    p = subprocess.Popen(cmd, env=child_env(OMP_NUM_THREADS='1'), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    metrics = tmp_path / 'int' / 'metrics.jsonl'
    for _ in range(1200):
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:  # past iter 5
            break
        time.sleep(0.05)
    p.send_signal(sig)
    out = p.communicate(timeout=120)[0]
    assert p.returncode != 0 and f'interrupted ({sig.name}): saved' in out, out
    assert f'exitcode  : {128 + sig}' in out or 'SignalException' in out, out
    saved = torch.load(tmp_path / 'int' / 'ckpt.pt', weights_only=True)['iter_num']
    assert 5 <= saved < 40
    torchrun(2, *common, '--out_dir', tmp_path / 'int', '--resume', 'true')
    ref, res = final_weights(tmp_path / 'ref'), final_weights(tmp_path / 'int')
    assert all(torch.equal(ref[k], res[k]) for k in ref)
    lines = [json.loads(line)['iter'] for line in open(metrics)]
    assert lines == sorted(set(lines)) and lines[-1] == 40


# ----------------------------------------------------------------------------- trust round 3

def damage_bytes(path, kind, where):
    """A file damaged in place: bytes flipped or zeroed, or the file cut, at its start, middle or end."""
    size = os.path.getsize(path)
    at = dict(start=0, middle=size // 2, end=size - 9)[where]
    if kind == 'truncate':
        os.truncate(path, at)
        return
    with open(path, 'r+b') as f:
        f.seek(at)
        chunk = f.read(8)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in chunk) if kind == 'flip' else bytes(len(chunk)))


def resigned(path, edit):
    """A checkpoint edited, with a checksum that matches (as a writer with a bug would leave it)."""
    ckpt = torch.load(path, weights_only=True)
    ckpt.pop('crc32')
    edit(ckpt)
    torch.save(dict(ckpt, crc32=guardrails.digest(ckpt)), path)
    return path


@pytest.mark.parametrize('kind', ['flip', 'zero', 'truncate'])
@pytest.mark.parametrize('where', ['start', 'middle', 'end'])
def test_damaged_checkpoints_are_refused_before_use(kind, where, tmp_path, data, teacher, caches, capsys):
    # a student's checkpoint, resumed; a teacher's, cached from: refused in one line, or (damage where
    # nothing is read, such as the zip's padding) loaded exactly as saved
    out = tmp_path / 'out'
    run(*train_args(data, caches, out, '--max_iters', 4))
    shutil.copy(teacher, tmp_path / 'teacher.pt')
    refused = {}
    for path in (out / 'ckpt.pt', tmp_path / 'teacher.pt'):
        good = torch.load(path, weights_only=True)
        damage_bytes(path, kind, where)
        try:
            ckpt = guardrails.load_checkpoint(str(path))
            refused[path] = False
        except SystemExit:
            err = capsys.readouterr().err
            assert err.count('\n') == 1 and ('does not match its checksum' in err or 'not a valid' in err), err
            refused[path] = True
            continue
        assert guardrails.digest({k: ckpt[k] for k in good if k != 'crc32'}) == good['crc32']
    before = files_of(out)
    with pytest.raises(SystemExit) if refused[out / 'ckpt.pt'] else contextlib.nullcontext():
        run(*train_args(data, caches, out, '--max_iters', 8), '--resume', 'true')
    assert files_of(out) == before or not refused[out / 'ckpt.pt']
    with pytest.raises(SystemExit) if refused[tmp_path / 'teacher.pt'] else contextlib.nullcontext():
        run(*cache_args(data, tmp_path / 'teacher.pt', tmp_path / 'c'))
    assert os.path.exists(tmp_path / 'c') != refused[tmp_path / 'teacher.pt']


@pytest.mark.parametrize('kind', ['flip', 'zero', 'truncate'])
@pytest.mark.parametrize('where', ['start', 'middle', 'end'])
@pytest.mark.parametrize('name', ['train.bin', 'val.bin', 'meta.json'])
def test_damaged_data_is_refused_before_a_step(kind, where, name, tmp_path, data, caches, capsys, monkeypatch):
    d = tmp_path / 'd'
    shutil.copytree(data, d)
    damage_bytes(d / name, kind, where)
    if files_of(d) == files_of(data):  # (zeroing bytes that were zero)
        return
    steps = []
    monkeypatch.setattr(rskd, 'get_lr', lambda *a: steps.append(a) or 1e-3)
    err = fail(capsys, *train_args(str(d), caches, tmp_path / 'out'))
    assert not steps and name in err and ('checksum' in err or 'bytes' in err or 'JSON' in err), err


def test_teacher_with_non_finite_weights_is_refused_before_anything_is_written(tmp_path, data, teacher, capsys):
    bad = shutil.copy(teacher, tmp_path / 't.pt')
    resigned(bad, lambda c: c['model']['transformer.h.0.mlp.c_fc.weight'].view(-1).__setitem__(3, float('nan')))
    assert 'weights that are not finite' in fail(capsys, *cache_args(data, bad, tmp_path / 'c'))
    assert not os.path.exists(tmp_path / 'c')


def test_a_resume_refuses_inputs_that_changed(tmp_path, data, teacher, caches, capsys):
    c = tmp_path / 'cache'
    shutil.copytree(caches['rs'], c)
    args = train_args(data, {'rs': c}, tmp_path / 'out', '--max_iters', 4)
    run(*args)
    before = files_of(tmp_path / 'out')
    shutil.rmtree(c)  # the cache made again at the same path, from another teacher
    other = resigned(shutil.copy(teacher, tmp_path / 't2.pt'), lambda k: k['model']['lm_head.weight'].mul_(1.01))
    run(*cache_args(data, other, c))
    err = fail(capsys, *args, '--max_iters', 8, '--resume', 'true')
    assert f"was trained with other cache ({c})" in err
    full = ['--mode', 'train', '--data_dir', data, *TINY, '--loss', 'fullkd', '--max_iters', 2, '--out_dir', tmp_path / 'fk']
    run(*full, '--teacher', teacher)
    err = fail(capsys, *full, '--teacher', other, '--max_iters', 4, '--resume', 'true')
    assert f"was trained with other teacher ({os.path.abspath(teacher)})" in err
    assert files_of(tmp_path / 'out') == before
    d2 = tmp_path / 'd2'  # the val split changed (its checksums made to match): evals would mix
    shutil.copytree(data, d2)
    np.fromfile(d2 / 'val.bin', np.uint16)[::-1].tofile(d2 / 'val.bin')
    edit_meta(d2 / 'meta.json', val_crc32=zlib.crc32(open(d2 / 'val.bin', 'rb').read()))
    err = fail(capsys, *full, '--teacher', teacher, '--data_dir', d2, '--max_iters', 4, '--resume', 'true')
    assert f"was trained with other val ({data}/val.bin)" in err


def test_options_the_cache_decides_are_taken_from_it(tmp_path, data, caches, capsys):
    topk = ['--mode', 'train', '--data_dir', data, *TINY, '--loss', 'topk', '--cache_dir', caches['topk'],
            '--max_iters', 2]
    assert 'made with k 5: drop --k' in fail(capsys, *topk, '--k', 4, '--out_dir', tmp_path / 'a')
    assert 'made with method topk: drop --method' in fail(capsys, *topk, '--method', 'rs', '--out_dir', tmp_path / 'a')
    assert 'shapes a cache, and this run reads none' in fail(
        capsys, '--mode', 'train', '--data_dir', data, *TINY, '--loss', 'ce', '--rounds', 9, '--out_dir', tmp_path / 'a')
    assert not os.path.exists(tmp_path / 'a')  # a failed first run leaves no folder behind
    run(*topk, '--out_dir', tmp_path / 'b')  # --k not given: the cache's is recorded, not the default 12
    assert f"from {caches['topk']}: method topk, split train, compress True, k 5" in capsys.readouterr().out
    assert torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['config']['k'] == 5
    run(*topk, '--k', 5, '--split', 'train', '--out_dir', tmp_path / 'c')  # what the cache says: fine


def test_out_of_memory_is_one_line(tmp_path, data, teacher, capsys, monkeypatch):
    def huge(*a):  # what torch's CPU allocator raises for a batch that does not fit
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 64328960000 bytes. Error code 12")
    monkeypatch.setattr(rskd, 'cache_batch', huge)
    assert 'out of memory' in fail(capsys, *cache_args(data, teacher, tmp_path / 'c'))


def test_resume_past_max_iters_says_so(tmp_path, data, caches, capsys):
    run(*train_args(data, caches, tmp_path, '--max_iters', 4))
    before = files_of(tmp_path)
    run(*train_args(data, caches, tmp_path, '--max_iters', 4), '--resume', 'true')
    assert f"{tmp_path}/ckpt.pt is at iter 4, --max_iters is 4: nothing to train" in capsys.readouterr().out
    assert files_of(tmp_path)['ckpt.pt'] == before['ckpt.pt']


def test_damaged_metrics_are_refused_where_read(tmp_path, data, caches, capsys, monkeypatch):
    import bench
    run(*train_args(data, caches, tmp_path / 'out', '--max_iters', 4))
    path = tmp_path / 'out' / 'metrics.jsonl'
    assert [r['iter'] for r in bench.read_metrics(path)] == [0, 4]
    text = path.read_text().replace('"iter": 4', '"iter": 5')
    path.write_text(text)
    with pytest.raises(SystemExit):
        bench.read_metrics(path)
    assert 'metrics.jsonl line 2 does not match its checksum' in capsys.readouterr().err


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_signals_exit_128_plus_their_number_and_resume_exactly(sig, tmp_path, data, teacher, caches):
    # training: the step finishes, the checkpoint is saved, exit 130/143; the resume ends where an
    # uninterrupted run does. caching: the cache keeps its commits, and the rerun makes the same bytes
    run(*train_args(data, caches, tmp_path / 'ref'))
    args = [str(a) for a in train_args(data, caches, tmp_path / 'int')]
    p = subprocess.run([sys.executable, '-c', kill_script('rskd.draw_seqs', 6, f"rskd.main({args!r})", sig)],
                       capture_output=True, text=True, env=child_env())
    assert p.returncode == 128 + sig and 'Traceback' not in p.stderr, p.stderr
    assert f"interrupted ({sig.name}): saved" in p.stderr
    run(*args, '--resume', 'true')
    ref, res = final_weights(tmp_path / 'ref'), final_weights(tmp_path / 'int')
    assert all(torch.equal(ref[k], res[k]) for k in ref)
    cache = [str(a) for a in cache_args(data, teacher, tmp_path / 'c')]
    p = subprocess.run([sys.executable, '-c', kill_script('rskd.cache_batch', 3, f"rskd.main({cache!r})", sig)],
                       capture_output=True, text=True, env=child_env())
    assert p.returncode == 128 + sig and p.stderr.count('\n') == 1, p.stderr
    run(*cache)
    assert files_of(tmp_path / 'c') == files_of(caches['rs'])


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize('where', ['teacher load', 'resume load', 'compile probe'])
def test_a_signal_inside_code_that_catches_every_error_is_still_a_stop(sig, where, tmp_path, data, teacher, caches):
    # loads and the compiler probe turn any exception into an error line; one that a signal raised
    # exits 128 + signal as an interrupt (not "not a valid checkpoint", not a compiler note)
    out = tmp_path / 'o'
    if where == 'resume load':
        run(*train_args(data, caches, out, '--max_iters', 2))
    args = {'teacher load': cache_args(data, teacher, tmp_path / 'c'),
            'resume load': train_args(data, caches, out, '--max_iters', 4, '--resume', 'true'),
            'compile probe': train_args(data, caches, out, '--compile', 'true')}[where]
    target = 'torch.compile' if where == 'compile probe' else 'torch.load'
    p = subprocess.run([sys.executable, '-c', kill_script(target, 1, f"rskd.main({[str(a) for a in args]!r})", sig)],
                       capture_output=True, text=True, env=child_env())
    assert p.returncode == 128 + sig and p.stderr.startswith(f"interrupted ({sig.name})"), p.stderr
    assert p.stderr.count('\n') == 1 and 'note:' not in p.stdout, p.stdout + p.stderr


def test_prepare_data_guard_rails(tmp_path, caches, capsys, monkeypatch):
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    for i in range(4):
        (corpus / f'{i}.txt').write_text(f"document {i} " * 40)
    os.mkfifo(corpus / 'pipe.txt')  # read, it would hang forever
    os.symlink(tmp_path / 'nowhere', corpus / 'broken.md')

    def fails(*argv):
        with pytest.raises(SystemExit) as e:
            prepare_data.main([str(a) for a in argv])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and err.startswith('error: ') and '\n' not in err, err
        return err
    out = tmp_path / 'data'
    prepare_data.main(['--input', str(corpus), '--out', str(out)])
    said = capsys.readouterr().out
    assert f"skipping {corpus}/pipe.txt: not a regular file" in said and 'broken.md: not a regular' in said
    assert '100.0%' in said
    cache = tmp_path / 'cache'
    shutil.copytree(caches['rs'], cache)
    before = {d: files_of(d) for d in (out, cache)}
    assert 'holds blocks.bin, which prepare_data.py does not write' in fails('--input', corpus, '--out', cache)
    (tmp_path / 'a_file').write_text('x')
    assert 'Not a directory' in fails('--input', corpus, '--out', tmp_path / 'a_file')
    held = open(out / '.lock', 'a+')  # another run holds the folder
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert 'is in use by another rskd run' in fails('--input', corpus, '--out', out)
    held.close()
    real_open = open

    def full_disk(path, mode='r', *a, **k):  # the .bin temp files land on a full disk
        return real_open('/dev/full' if str(path).endswith('.bin.tmp') else path, mode, *a, **k)
    os.makedirs(out / 'meta.json.tmp')  # the new meta.json cannot be written: the old dataset stays
    assert 'Is a directory: ' in fails('--input', corpus, '--out', out)
    os.rmdir(out / 'meta.json.tmp')
    monkeypatch.setattr(guardrails, 'open', full_disk, raising=False)
    assert 'No space left on device' in fails('--input', corpus, '--out', out)
    assert {d: files_of(d) for d in before} == before and not glob.glob(f'{out}/*.tmp')


def test_prepare_data_interrupted_exits_130_and_keeps_the_old_data(tmp_path):
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    (corpus / 'a.txt').write_text("some words " * 100)
    (corpus / 'b.txt').write_text("other words " * 100)
    out = str(tmp_path / 'data')
    prepare_data.main(['--input', str(corpus), '--out', out])
    before = files_of(out)
    script = kill_script('prepare_data.documents', 1, f"import prepare_data\nprepare_data.main(['--input', "
                         f"{str(corpus)!r}, '--out', {out!r}])", signal.SIGINT)
    p = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=child_env())
    assert p.returncode == 130 and 'Traceback' not in p.stderr and p.stderr.startswith('interrupted (SIGINT)'), p.stderr
    assert files_of(out) == before


# ----------------------------------------------------------------------------- mixed precision, compile

def test_gpu_choices_without_a_gpu(monkeypatch, capsys):
    # the CUDA decisions, with torch.cuda faked: --dtype auto from the compute capability (a V100's
    # emulated bfloat16 does not count), cuda:N made the current device, more ranks than GPUs refused
    # before any rank waits, and each GPU's own peak for MFU
    from model import peak_flops
    for capability, want in (((7, 0), 'float16'), ((7, 5), 'float16'), ((8, 0), 'bfloat16'), ((9, 0), 'bfloat16')):
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None, c=capability: c)
        assert guardrails.resolve_dtype('auto', 'cuda:0') == want
    assert guardrails.resolve_dtype('auto', 'cpu') == 'float32' and guardrails.resolve_dtype('float16', 'cpu') == 'float16'
    current = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'set_device', current.append)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: f'fake {device}')
    # (the isolated fixture puts any backend flags a test changes back by value)
    env = guardrails.setup(rskd.Config(device='cuda:1', dtype='float32', compile='false'))
    assert current == ['cuda:1'] and env.name == 'fake cuda:1' and env.device_type == 'cuda'
    for name, value in (('RANK', '0'), ('LOCAL_RANK', '0'), ('LOCAL_WORLD_SIZE', '3'), ('WORLD_SIZE', '3')):
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as e:
        guardrails.setup(rskd.Config(device='auto'))
    assert e.value.code == 1
    assert 'torchrun started 3 processes on this machine, which has 2 GPUs' in capsys.readouterr().err
    peaks = {'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H100 PCIe': 756e12, 'NVIDIA H100 NVL': 835e12,
             'NVIDIA H200': 989e12, 'NVIDIA A100-SXM4-80GB': 312e12, 'NVIDIA L40S': 362e12,
             'NVIDIA L40': 181e12, 'NVIDIA L4': 121e12, 'Tesla V100-SXM2-16GB': None}
    assert {name: peak_flops(name) for name in peaks} == peaks
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    assert model.estimate_mfu(1e6, 'NVIDIA H100 PCIe', 'float32') is None
    assert model.estimate_mfu(1e6, 'NVIDIA H100 PCIe', 'bfloat16') == pytest.approx(model.flops_per_token() * 1e6 / 756e12)



def test_output_layer_is_float32_under_bf16_autocast(teacher):
    # the same hidden states through the output layer: a teacher's logits under bf16 autocast equal the
    # float32 ones, where autocast alone would round them to bfloat16
    ckpt = torch.load(teacher, weights_only=True)
    model = GPT(GPTConfig(**ckpt['model_config']))
    model.load_state_dict(ckpt['model'])
    model.eval()
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        exact = model(idx)
        model.to_teacher('bfloat16')  # the blocks' matmuls in bfloat16, the output layer in float32
        with torch.autocast('cpu', dtype=torch.bfloat16):
            hidden = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(16))
            for block in model.transformer.h:
                hidden = block(hidden)
            hidden = model.transformer.ln_f(hidden)
            logits = model(idx)
            model.float32_head = False
            rounded = model(idx)
    assert logits.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    assert all(m.weight.dtype == torch.bfloat16 for m in model.transformer.h.modules() if isinstance(m, torch.nn.Linear))
    assert model.lm_head.weight.dtype == torch.float32 and hidden.dtype == torch.float32
    head = hidden @ model.lm_head.weight[:V].t()  # float32, from the bf16 blocks' hidden states
    assert torch.allclose(logits, head, atol=1e-5)
    assert (rounded.float() - logits).abs().max() > 10 * (logits - head).abs().max()
    assert (logits - exact).abs().max() < 0.5  # the bf16 blocks' own error remains


def test_bf16_cache_and_training_on_cpu(tmp_path, data, teacher, caches):
    run(*cache_args(data, teacher, tmp_path / 'c', '--dtype', 'bfloat16'))
    meta = json.load(open(tmp_path / 'c' / 'meta.json'))
    assert meta['complete'] and meta['dtype'] == 'bfloat16'
    # the draws move a little with the teacher's bf16 blocks, the cache stays as sharp as the float32 one
    assert abs(meta['entries'] / json.load(open(os.path.join(caches['rs'], 'meta.json')))['entries'] - 1) < 0.02
    run('--mode', 'verify', '--data_dir', data, '--cache_dir', tmp_path / 'c', *TINY)
    for loss in (['rskd'], ['fullkd']):
        run('--mode', 'train', '--data_dir', data, '--cache_dir', tmp_path / 'c', '--teacher', teacher, *TINY,
            '--dtype', 'bfloat16', '--max_iters', 4, '--eval_interval', 2, '--out_dir', tmp_path / loss[0], '--loss', *loss)
        lines = [json.loads(l) for l in open(tmp_path / loss[0] / 'metrics.jsonl')]
        assert [l['iter'] for l in lines] == [0, 2, 4] and all(math.isfinite(l['kl_teacher']) for l in lines)
        assert lines[-1]['val_loss'] < lines[0]['val_loss']


def test_float16_gradscaler_and_resume_across_dtypes(tmp_path, data, caches):
    args = ['--mode', 'train', '--data_dir', data, '--cache_dir', caches['rs'], *TINY, '--eval_interval', 2]
    run(*args, '--dtype', 'float16', '--max_iters', 2, '--out_dir', tmp_path / 'a')
    scaler = torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)['scaler']
    assert scaler and scaler['scale'] > 0  # a GradScaler ran
    run(*args, '--dtype', 'bfloat16', '--max_iters', 4, '--out_dir', tmp_path / 'a', '--resume', 'true')
    # a run saved without a scaler (float32) resumed in float16: a new scaler, no error
    run(*args, '--dtype', 'float32', '--max_iters', 2, '--out_dir', tmp_path / 'b')
    run(*args, '--dtype', 'float16', '--max_iters', 4, '--out_dir', tmp_path / 'b', '--resume', 'true')
    for d in ('a', 'b'):
        lines = [json.loads(l) for l in open(tmp_path / d / 'metrics.jsonl')]
        assert [l['iter'] for l in lines] == [0, 2, 4] and math.isfinite(lines[-1]['val_loss'])


def test_compile_trains_like_eager(tmp_path, data, caches):
    # torch.compile (inductor, on the CPU) of a short run: the same losses as eager, to float rounding
    args = ['--mode', 'train', '--data_dir', data, '--cache_dir', caches['rs'], *TINY, '--max_iters', 3,
            '--eval_interval', 3]
    run(*args, '--out_dir', tmp_path / 'eager')
    run(*args, '--out_dir', tmp_path / 'compiled', '--compile', 'true')
    eager, compiled = ([json.loads(l) for l in open(tmp_path / d / 'metrics.jsonl')] for d in ('eager', 'compiled'))
    assert [l['iter'] for l in compiled] == [0, 3]
    assert all(abs(a['val_loss'] - b['val_loss']) < 1e-3 for a, b in zip(eager, compiled))


def test_a_compiler_that_fails_falls_back_or_stops(tmp_path, data, caches, capsys, monkeypatch):
    # no working C compiler or Triton: torch.compile fails at the first compiled call. --compile true stops
    # with one line before anything is written; auto (which compiles on CUDA) goes on uncompiled, saying so
    def broken(fn, *a, **k):
        def call(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config")
        return call
    monkeypatch.setattr(torch, 'compile', broken)
    err = fail(capsys, '--mode', 'train', '--data_dir', data, '--cache_dir', caches['rs'], *TINY,
               '--out_dir', tmp_path / 'o', '--compile', 'true')
    assert 'torch.compile fails here (InvalidCxxCompiler' in err and 'use --compile false' in err
    assert not os.path.exists(tmp_path / 'o')
    env = SimpleNamespace(device='cpu', master=True)
    assert guardrails.compile_works(env, 'auto') is False
    assert 'torch.compile fails here (InvalidCxxCompiler' in capsys.readouterr().out


def compiled_graphs(monkeypatch):
    """torch.compile with the eager backend (fast: dynamo still traces, and recompiles for a new shape);
    the dynamo counters, reset, whose 'unique_graphs' counts the graphs compiled."""
    import torch._dynamo
    real = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda fn, *a, **k: real(fn, backend='eager'))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch._dynamo.utils.counters['stats']


def test_a_short_last_batch_is_padded_not_recompiled(tmp_path, data, teacher, caches, monkeypatch):
    # 13 sequences in batches of 4 end with a batch of 1, padded to 4: no second graph, the same bytes as
    # the first 13 sequences of a cache made in full batches; the same for a short eval batch
    stats = compiled_graphs(monkeypatch)
    run(*cache_args(data, teacher, tmp_path / 'c12', '--max_seqs', 12, '--compile', 'true'))
    full = stats['unique_graphs']
    stats = compiled_graphs(monkeypatch)
    run(*cache_args(data, teacher, tmp_path / 'c13', '--max_seqs', 13, '--compile', 'true'))
    assert stats['unique_graphs'] == full
    assert decoded_seqs(tmp_path / 'c13', range(13)) == decoded_seqs(caches['rs'], range(13))
    # the val split: 5 sequences, evaluated in batches of 4 (a short one of 1), by a compiled student
    short = write_data(tmp_path / 'd', n_train=20000, n_val=16 * 5 + 1)
    args = ['--mode', 'train', '--data_dir', short, '--loss', 'ce', *TINY, '--max_iters', 2, '--eval_interval', 2,
            '--compile', 'true']
    stats = compiled_graphs(monkeypatch)
    run(*args, '--out_dir', tmp_path / 'o', '--eval_iters', 1)  # one full val batch of 4
    one = stats['unique_graphs']
    stats = compiled_graphs(monkeypatch)
    run(*args, '--out_dir', tmp_path / 'o2', '--eval_iters', 2)  # 5 sequences: 4, then 1 padded
    assert stats['unique_graphs'] == one


def decoded_seqs(d, seqs):
    meta = guardrails.read_cache_meta(str(d), rskd.FORMATS)
    mm = guardrails.cache_memmaps(str(d), meta, rskd.FORMATS)
    return {k: v.tobytes() for k, v in guardrails.read_rows(mm, meta, rskd.FORMATS, list(seqs)).items()}


HOST_READS = ('item', 'tolist', '__bool__', '__float__', '__int__', '__index__')


def count_host_reads(monkeypatch, reads):
    """Each read of a tensor's value by the host (a sync on a GPU) appends its method to reads, unless it
    reads what lives on the host on a GPU machine too: a batch being fetched (the cache reader's
    tensors) or the optimizer's step count (AdamW keeps it on the CPU)."""
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, _name=name, **k):
            frame = sys._getframe(1)
            while frame and frame.f_code.co_name not in ('fetch', '_get_value'):
                frame = frame.f_back
            if frame is None:
                reads.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counting)


def test_one_host_sync_per_training_step(tmp_path, data, caches, monkeypatch):
    # two runs that differ by 4 steps and nothing else (the same evals, logs and saves): those 4 steps read
    # the device 4 times, the loss, gradient norm and signals together
    counts = []
    for steps in (2, 6):
        reads = []
        with monkeypatch.context() as m:
            count_host_reads(m, reads)
            run('--mode', 'train', '--data_dir', data, '--cache_dir', caches['rs'], *TINY, '--max_iters', steps,
                '--eval_interval', 100, '--log_interval', 100, '--out_dir', tmp_path / f'o{steps}')
        counts.append(len(reads))
    assert counts[1] - counts[0] == 4, counts


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)
# python -m pytest -q test_rskd.py -k cuda: about 5 minutes on one H200 (all of them skip on a CPU machine)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_sampler_is_unbiased():
    N, M = 50, 4000
    p = P97.cuda()
    draws = rskd.sample_draws(p.expand(1, M, V).contiguous(), N, [torch.Generator('cuda').manual_seed(0)])
    lengths, ids, counts = rskd.run_lengths(draws)
    ids, c = rskd.pad_rows(lengths, ids, counts)
    est = torch.zeros(M, V, device='cuda').scatter_add_(1, ids, c).mean(0).cpu() / N
    tol = 5 * torch.sqrt(P97 * (1 - P97) / (N * M)) + 1e-6
    assert ((est - P97).abs() <= tol).all() and c.sum() == N * M


@cuda
def test_cuda_caches_agree_with_cpu(tmp_path, data, teacher, caches):
    # a bf16 compiled teacher on the GPU: its Top-K ids and probabilities agree with the CPU's float32
    # cache, and its RS cache is as sharp; then float32 on the GPU (TF32 off) gives the same Top-K ids
    gpu = ['--device', 'cuda', '--compile', 'true']
    for method in ('topk', 'rs'):
        run(*cache_args(data, teacher, tmp_path / method, '--method', method, '--k', 5, *gpu, '--dtype', 'bfloat16'))
        run('--mode', 'verify', '--data_dir', data, '--cache_dir', tmp_path / method, *TINY)
    cpu_ids = np.fromfile(os.path.join(caches['topk'], 'ids.bin'), np.uint16).reshape(-1, 5)
    cpu_p = np.fromfile(os.path.join(caches['topk'], 'probs.bin'), np.float16).reshape(-1, 5).astype(np.float32)
    gpu_ids = np.fromfile(tmp_path / 'topk' / 'ids.bin', np.uint16).reshape(-1, 5)
    gpu_p = np.fromfile(tmp_path / 'topk' / 'probs.bin', np.float16).reshape(-1, 5).astype(np.float32)
    assert (gpu_ids[:, 0] == cpu_ids[:, 0]).mean() > 0.98 and np.abs(gpu_p - cpu_p).max() < 0.05
    meta = json.load(open(tmp_path / 'rs' / 'meta.json'))
    cpu_meta = json.load(open(os.path.join(caches['rs'], 'meta.json')))
    assert meta['device'] == 'cuda' and meta['device_name'] == torch.cuda.get_device_name()
    assert abs(meta['entries'] / cpu_meta['entries'] - 1) < 0.02


@cuda
def test_cuda_one_sync_per_training_step(tmp_path, data, caches):
    # torch's own sync detector: 4 more steps, 4 more synchronising calls (the one read of loss, gradient
    # norm and signals); the cache rows are copied in while the GPU works
    import warnings
    counts = []
    for steps in (2, 6):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            try:
                run('--mode', 'train', '--data_dir', data, '--cache_dir', caches['rs'], *TINY, '--device', 'cuda',
                    '--max_iters', steps, '--eval_interval', 100, '--log_interval', 100, '--out_dir', tmp_path / f'o{steps}')
            finally:
                torch.cuda.set_sync_debug_mode(0)
        counts.append(sum('synchroniz' in str(w.message) for w in caught))
    assert counts[1] - counts[0] <= 4, counts


@cuda
@pytest.mark.parametrize('loss', [['rskd', '--compile', 'true'], ['topk'], ['topk', '--topk_tail', 'ghost'], ['fullkd'],
                                  ['rskd', '--dtype', 'float16']])
def test_cuda_students(tmp_path, data, teacher, caches, loss):
    cache = caches['topk' if loss[0] == 'topk' else 'rs']
    run('--mode', 'train', '--data_dir', data, '--cache_dir', cache, '--teacher', teacher, *TINY, '--device', 'cuda',
        '--max_iters', 6, '--eval_interval', 3, '--out_dir', tmp_path, '--loss', *loss)
    lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
    assert [l['iter'] for l in lines] == [0, 3, 6] and all(math.isfinite(l['kl_teacher']) for l in lines)
    assert lines[-1]['val_loss'] < lines[0]['val_loss']
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert bool(ckpt['scaler']) == ('float16' in loss)  # a GradScaler only for float16


@cuda
def test_cuda_bench(tmp_path, data, teacher):
    run('--mode', 'bench', '--data_dir', data, '--teacher', teacher, '--out_dir', tmp_path, *TINY, '--device', 'cuda')
    res = json.load(open(tmp_path / 'bench.json'))
    assert res['device'] == torch.cuda.get_device_name() and res['dtype'] in ('bfloat16', 'float16')
    assert all(v >= 0 for v in res['peak_mem_bytes'].values()) and res['pipeline_host_ms']


@cuda
def test_cuda_torchrun_nccl(tmp_path, data, caches):
    # 1 rank (and 2 where there are 2 GPUs) with NCCL: the same training as one process
    common = ['--mode', 'train', '--data_dir', data, '--cache_dir', caches['rs'], *TINY, '--eval_interval', 2,
              '--max_iters', 4, '--device', 'cuda', '--dtype', 'float32']
    ranks = 2 if torch.cuda.device_count() >= 2 else 1
    run(*common, '--out_dir', tmp_path / 'one', '--gradient_accumulation_steps', ranks)
    torchrun(ranks, *common, '--out_dir', tmp_path / 'many')
    one, many = final_weights(tmp_path / 'one'), final_weights(tmp_path / 'many')
    assert all(torch.allclose(one[k], many[k], atol=1e-4) for k in one)
    p = torchrun(torch.cuda.device_count() + 1, *common, '--out_dir', tmp_path / 'too_many', ok=False)
    # each worker's one line (torchrun's own launcher prints a traceback of its ChildFailedError)
    assert 'processes on this machine, which has' in p.stdout + p.stderr
    assert 'rskd.py", line' not in p.stderr and 'guardrails.py", line' not in p.stderr


# ----------------------------------------------------------------------------- soak (not in CI)


@pytest.mark.skipif(not os.environ.get('RSKD_SOAK'), reason="set RSKD_SOAK=1 to run the kill-and-resume soak test")
def test_soak_random_kills(tmp_path):
    """The quick-start pipeline under random SIGKILLs, each step rerun (with --resume true once it has a
    checkpoint) until it completes; then the same pipeline without kills. The data and the cache must be
    byte-identical and the student's weights equal. prepare_data runs on its default corpus; the models
    run on a synthetic corpus (RSKD_SOAK_SCALE sizes it) to keep this to minutes on a CPU."""
    import random
    rng = random.Random(int(os.environ.get('RSKD_SOAK_SEED', 0)))
    scale = float(os.environ.get('RSKD_SOAK_SCALE', 1))
    data = write_data(tmp_path / 'data', n_train=int(400000 * scale))
    model = ['--n_layer', 2, '--n_embd', 64, '--batch_size', 16, '--block_size', 32]
    # a checkpoint every 20 steps (a fraction of a second), so that most runs between kills save some progress
    iters = ['--max_iters', int(1500 * scale), '--eval_interval', 20, '--eval_iters', 2]
    rskd_py = [os.path.join(HERE, 'rskd.py'), '--data_dir', data, '--device', 'cpu', *model]
    steps = dict(prepare_data=[os.path.join(HERE, 'prepare_data.py'), '--out', 'prepared'],
                 teacher=[*rskd_py, '--mode', 'teacher', '--out_dir', 'teacher', *iters],
                 cache=[*rskd_py, '--mode', 'cache', '--teacher', 'teacher/ckpt.pt', '--cache_dir', 'cache',
                        '--commit_seconds', 1],
                 student=[*rskd_py, '--mode', 'train', '--cache_dir', 'cache', '--out_dir', 'student', '--n_layer', 1,
                          '--n_embd', 32, *iters])
    kills = {name: 0 for name in steps}
    for root, kill in (('killed', True), ('clean', False)):
        os.makedirs(tmp_path / root)
        for name, step in steps.items():
            while True:
                resume = ['--resume', 'true'] if os.path.exists(tmp_path / root / name / 'ckpt.pt') else []
                p = subprocess.Popen([sys.executable, *map(str, step), *resume], cwd=tmp_path / root,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                try:
                    p.wait(timeout=rng.uniform(1.5, 6) if kill else None)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    kills[name] += 1
                    assert kills[name] < 500, f"{name}: no progress after {kills[name]} kills"
                    continue
                assert p.returncode == 0, p.stderr.read().decode()
                break
    print(f"soak: the pipeline survived {sum(kills.values())} SIGKILLs {kills}")
    clean, killed = (files_of(tmp_path / root / 'prepared') for root in ('clean', 'killed'))
    assert clean == killed
    clean, killed = (files_of(tmp_path / root / 'cache') for root in ('clean', 'killed'))
    metas = [json.loads(d.pop('meta.json')) for d in (clean, killed)]
    for m in metas:  # the teacher's path differs (clean/ or killed/), and so the crc32 over it;
        del m['teacher']['name'], m['crc32']  # its weights' hash must not
    assert clean == killed and metas[0] == metas[1]
    a, b = final_weights(tmp_path / 'clean' / 'student'), final_weights(tmp_path / 'killed' / 'student')
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- using the student

def gpt2_checkpoint(path, vocab=50257, seed=0, **shape):
    """A tiny GPT with GPT-2's vocabulary, saved as a checkpoint of ours."""
    torch.manual_seed(seed)
    config = dict(block_size=32, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16, **shape)
    state = dict(model=GPT(GPTConfig(**config)).state_dict(), model_config=config, config={}, iter_num=0)
    os.makedirs(path, exist_ok=True)
    torch.save(dict(state, crc32=guardrails.digest(state)), os.path.join(path, 'ckpt.pt'))
    return str(path)


def sample(capsys, *argv):
    import sample as sample_py
    capsys.readouterr()
    sample_py.main([str(a) for a in argv])
    return capsys.readouterr().out


def test_sample_is_repeatable_and_top_k_1_is_greedy(tmp_path, teacher, capsys):
    d = os.path.dirname(teacher)
    args = ['--out_dir', d, '--start', 'a', '--num_samples', 2, '--max_new_tokens', 40]
    one, again, other = sample(capsys, *args), sample(capsys, *args), sample(capsys, *args, '--seed', 7)
    assert one == again and one != other and one.count('---------------') == 2
    # --top_k 1: the most likely token each time, whatever the seed and temperature
    model = GPT(GPTConfig(**torch.load(teacher, weights_only=True)['model_config']))
    model.load_state_dict(torch.load(teacher, weights_only=True)['model'])
    idx = torch.tensor([[64]])  # 'a'
    for _ in range(40):
        idx = torch.cat([idx, model.eval()(idx[:, -16:])[:, -1].argmax(-1, keepdim=True)], 1)
    import tiktoken
    greedy = tiktoken.get_encoding('gpt2').decode(idx[0].tolist())
    for seed in (1, 2):
        out = sample(capsys, *args, '--top_k', 1, '--seed', seed, '--temperature', 1.5)
        assert out.split('\n---------------\n')[0] == greedy
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text('!a' * 100)  # 200 tokens, longer than block_size 16: cropped, not refused
    assert sample(capsys, '--out_dir', d, '--start', f'FILE:{prompt}', '--num_samples', 1, '--max_new_tokens', 3)


def test_sample_errors_are_one_line(tmp_path, teacher, capsys):
    d = os.path.dirname(teacher)
    (tmp_path / 'empty.txt').write_text('')
    for argv, words in [(['--out_dir', tmp_path / 'none'], 'ckpt.pt not found'),
                        (['--out_dir', d, '--start', ''], 'the prompt is empty'),
                        (['--out_dir', d, '--start', f"FILE:{tmp_path / 'empty.txt'}"], 'the prompt is empty'),
                        (['--out_dir', d, '--start', f"FILE:{tmp_path / 'missing.txt'}"], 'No such file'),
                        (['--out_dir', d, '--start', 'Zürich'], "outside this model's vocabulary of 97"),
                        (['--out_dir', d, '--top_k', 0], '--top_k must be at least 1')]:
        with pytest.raises(SystemExit) as e:
            sample(capsys, *argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and err.startswith('error: ') and '\n' not in err and words in err, err


def test_export_to_hugging_face(tmp_path, capsys):
    transformers = __import__('transformers') if os.environ.get('CI') else pytest.importorskip('transformers')
    d = gpt2_checkpoint(tmp_path / 'out')
    run('--mode', 'export', '--out_dir', d)
    ckpt = torch.load(os.path.join(d, 'ckpt.pt'), weights_only=True)
    ours = GPT(GPTConfig(**ckpt['model_config'])).eval()
    ours.load_state_dict(ckpt['model'])
    hf = transformers.GPT2LMHeadModel.from_pretrained(f'{d}/hf').eval()
    assert hf.lm_head.weight.shape[0] == 50257  # the real vocabulary only
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max() <= 1e-4
    greedy = hf.generate(idx[:1, :4], max_new_tokens=20, do_sample=False, pad_token_id=50256)
    assert torch.equal(greedy, ours.generate(idx[:1, :4], 20, top_k=1))
    back = GPT.from_pretrained(f'{d}/hf').eval()  # imported back: the same logits again
    with torch.no_grad():
        assert (back(idx) - ours(idx)).abs().max() <= 1e-4
    import tiktoken
    text = open(RSKD_PY).read() + " naïve 日本 \t\n  <|endoftext|>x"
    tokenizer = transformers.AutoTokenizer.from_pretrained(f'{d}/hf')
    assert tokenizer(text)['input_ids'] == tiktoken.get_encoding('gpt2').encode(text, allowed_special='all')
    out = transformers.pipeline('text-generation', model=f'{d}/hf')('Hello', max_new_tokens=5, do_sample=False)
    assert out[0]['generated_text'].startswith('Hello')
    with pytest.MonkeyPatch.context() as m:
        m.setitem(sys.modules, 'transformers', None)  # import transformers now fails
        assert 'transformers is missing: pip install transformers' in fail(capsys, '--mode', 'export', '--out_dir', d)
    assert 'ckpt.pt not found' in fail(capsys, '--mode', 'export', '--out_dir', tmp_path / 'nothing')
    assert not os.path.exists(tmp_path / 'nothing')


def test_init_from_a_gpt2_folder_or_a_checkpoint(tmp_path, data, capsys):
    transformers = __import__('transformers') if os.environ.get('CI') else pytest.importorskip('transformers')
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=24, n_layer=3, n_head=3)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / 'hf')
    args = ['--mode', 'train', '--data_dir', data, '--block_size', 16, '--batch_size', 4, '--loss', 'ce',
            '--max_iters', 0, '--eval_iters', 4]
    run(*args, '--init_from', tmp_path / 'hf', '--out_dir', tmp_path / 'a')
    ckpt = torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)
    assert (ckpt['config']['n_layer'], ckpt['config']['n_embd'], ckpt['model_config']['n_head']) == (3, 24, 3)
    # it starts at that model's val loss
    model = GPT.from_pretrained(str(tmp_path / 'hf'))
    tokens = np.memmap(os.path.join(data, 'val.bin'), np.uint16, mode='r')
    S = (len(tokens) - 1) // 16
    seqs = np.unique(np.linspace(0, S - 1, min(4 * 4, S)).round().astype(int)).tolist()
    env = SimpleNamespace(device='cpu', device_type='cpu', ctx=contextlib.nullcontext(), rank=0, world=1, ddp=False)
    cfg = SimpleNamespace(batch_size=4, block_size=16)
    want = rskd.evaluate(model, None, tokens, seqs, cfg, env)['val_loss']
    got = json.loads(open(tmp_path / 'a' / 'metrics.jsonl').readline())['val_loss']
    assert round(got, 4) == round(want, 4)
    # a checkpoint of ours works the same way; a shape option that contradicts it is refused
    run(*args, '--init_from', tmp_path / 'a' / 'ckpt.pt', '--out_dir', tmp_path / 'b')
    assert torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['model_config']['n_embd'] == 24
    assert '--n_layer 2: --init_from' in fail(capsys, *args, '--init_from', tmp_path / 'hf', '--n_layer', 2,
                                             '--out_dir', tmp_path / 'c')


def test_a_cache_serves_any_prefix_of_its_data(tmp_path, data, teacher, capsys):
    run(*cache_args(data, teacher, tmp_path / 'c128', '--max_seqs', 128))
    run(*cache_args(data, teacher, tmp_path / 'c64', '--max_seqs', 64))
    for c in ('c128', 'c64'):
        capsys.readouterr()
        run('--mode', 'train', '--data_dir', data, *TINY, '--max_seqs', 64, '--cache_dir', tmp_path / c,
            '--max_iters', 12, '--eval_interval', 6, '--out_dir', tmp_path / f'out-{c}')
        said = capsys.readouterr().out
        assert (f"using the first 64 of the 128 sequences of {tmp_path / 'c128'}" in said) == (c == 'c128')
    a, b = final_weights(tmp_path / 'out-c128'), final_weights(tmp_path / 'out-c64')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_version_3_cache_is_read_as_it_is(tmp_path, data, teacher, caches, capsys):
    # today's uncompressed layout under the last version's meta.json: trained from as it is; resumed only
    # into the same storage, the default being refused with one line that names the option
    shutil.copytree(caches['rs-plain'], tmp_path / 'v3')
    edit_meta(tmp_path / 'v3' / 'meta.json', version=3, compress=None, block_bytes=None)
    run('--mode', 'train', '--data_dir', data, '--cache_dir', tmp_path / 'v3', *TINY, '--max_iters', 2,
        '--eval_interval', 2, '--out_dir', tmp_path / 'o')
    assert 'compress False' in capsys.readouterr().out
    d = tmp_path / 'part'
    run_killed('guardrails.write_json', 3, f"rskd.main({[str(a) for a in cache_args(data, teacher, d, '--compress', 'false')]!r})")
    edit_meta(d / 'meta.json', version=3, compress=None, block_bytes=None)
    assert 'made with a different compress (False vs now True)' in fail(capsys, *cache_args(data, teacher, d))
    run(*cache_args(data, teacher, d, '--compress', 'false'))
    ours, ref = files_of(d), files_of(caches['rs-plain'])
    assert json.loads(ours.pop('meta.json'))['version'] == 4 and ref.pop('meta.json')
    assert ours == ref


def test_a_damaged_vocabulary_order_is_refused_on_resume(tmp_path, data, teacher, capsys):
    d = tmp_path / 'c'
    run_killed('guardrails.write_json', 3, f"rskd.main({[str(a) for a in cache_args(data, teacher, d)]!r})")
    order = np.memmap(d / 'vocab_order.bin', np.uint16, 'r+')
    order[5] = order[6]  # no longer every id once
    order.flush()
    assert 'vocab_order.bin is damaged' in fail(capsys, *cache_args(data, teacher, d))
