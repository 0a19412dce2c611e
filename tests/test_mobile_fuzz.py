"""Sanitizer fuzzing of the loader: >= 2,000 mutated files (bit flips, truncations, header-field, tensor-table and
tokenizer-blob edits, f32 <-> f16 swaps of a router with the format version changed) loaded in-process by mobile/c/fuzz.c under ASan + UBSan; every mutant the loader accepts
also runs a prefill + decode step and a tokenizer round trip. Every 4th mutant is also opened the streaming way
(pread of the resident tensors, a minimum-budget expert cache reading experts from the file), which must accept
exactly what the buffer loader accepts. 0 crashes and 0 sanitizer reports are required."""

from __future__ import annotations

import os
import re
import subprocess

from tests._mobile_util import BUILD, build_engine

N_CASES = 2000


def test_fuzz_loader_under_sanitizers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from mobile.export import export_random

    build_engine("SANITIZE=1", "fuzz")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    # a small seed file (2 layers, vocab 512) keeps each case cheap; its layout is the tiny preset's
    seed = export_random("tiny", tmp_path / "seed.mmoe", n_layers=2, vocab_size=512,
                         tokenizer_json=str(tmp_path / "tokenizer.json"))
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=86",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87")
    r = subprocess.run([str(BUILD / "san" / "mmoe-fuzz"), str(seed), str(N_CASES), "12345"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"fuzz driver failed (rc {r.returncode}):\n{r.stderr[-4000:]}"
    assert "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr[-4000:]
    m = re.search(r"cases (\d+) accepted (\d+) rejected (\d+) streamed (\d+) f16-router (\d+)", r.stdout)
    assert m, r.stdout
    cases, accepted, rejected, streamed, f16 = map(int, m.groups())
    assert cases == N_CASES and accepted + rejected == N_CASES
    # both outcomes must be exercised: mutants that load (and run) and mutants that are rejected
    assert accepted >= 100 and rejected >= 1000, (accepted, rejected)
    assert streamed >= 25, streamed  # the streaming open and its expert-cache reads ran on accepted mutants
    assert f16 >= 40, f16  # the seed's routers are f32: these mutants load (version 2) and route in fp16
    print(f"fuzz: {cases} cases, {accepted} accepted and run ({f16} with an f16 router), {rejected} rejected, "
          f"{streamed} streamed, 0 sanitizer reports")
