"""Encoder / decoder shapes, KV-cache equivalence and the grammar of constrained greedy decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnc_gcode.config import DecoderConfig, EncoderConfig
from cnc_gcode.decoding import Grammar, decode_cached, decode_uncached, greedy_decode
from cnc_gcode.model import build_decoder, build_encoder, decoder_inputs
from cnc_gcode.tokenizer import EOS, PAD, SOS, TokenizeError, Vocabulary, tokenize_text

TINY_DEC = DecoderConfig(d_model=32, n_heads=4, n_layers=2, ff_dim=64, max_seq_len=8)


def test_encoder_shapes_and_reconstruction():
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(hidden_dim=32, lstm_layers=2), continuous_dim=11)
    memory, op_logits = enc(torch.randn(3, 20, 11), torch.randint(0, 3, (3, 20, 4)))
    assert memory.shape == (3, 20, 32) and op_logits.shape == (3, 9)
    assert enc.reconstruct(memory).shape == (3, 20, 11)


@pytest.mark.parametrize("share", [True, False])
def test_cached_step_matches_full_forward(share):
    torch.manual_seed(0)
    vocab = Vocabulary()
    dec = build_decoder(DecoderConfig(**{**TINY_DEC.__dict__, "share_cross_kv": share}), vocab, 16).eval()
    memory = torch.randn(4, 10, 16)
    targets = torch.tensor([tokenize_text(vocab, t) for t in ("G1 X1 Y2 F300", "G0 Z5", "M30", "G3 X1 R2 F10")])
    with torch.no_grad():
        full = dec(memory, decoder_inputs(targets))
        cache, cross, context = dec.empty_cache(4), dec.cross_kv(memory), dec.step_context(memory)
        previous = torch.full((4, 1), SOS)
        for position in range(vocab.max_tokens):
            step, cache = dec.step(previous, torch.tensor([position]), cache, cross, context)
            for head in full:  # one step vs the whole sequence: other GEMM shapes, float32 rounding apart
                torch.testing.assert_close(step[head][:, 0], full[head][:, position], rtol=1e-5, atol=1e-5)
            previous = targets[:, position:position + 1]
    # token ids (integers): greedy picks agree unless two logits tie within the 1e-5 above
    assert torch.equal(torch.from_numpy(decode_cached(dec, memory, vocab)),
                       torch.from_numpy(decode_uncached(dec, memory, vocab)))


@pytest.mark.parametrize("vocab", [Vocabulary(), Vocabulary.seed()], ids=["exact", "seed4"])
def test_constrained_decoding_always_gives_valid_lines(vocab):
    rng = np.random.default_rng(0)
    shapes = {"type": (4,), "command": (vocab.n_commands,), "ptype": (vocab.n_param_types,),
              "exponent": (vocab.n_exponents,), "digits": (vocab.n_digits, 10)}
    batch = 64

    def random_step(previous, position):
        return {k: rng.normal(0, 3, (batch, *s)) for k, s in shapes.items()}

    ids = greedy_decode(random_step, vocab, batch)
    for row in ids:
        assert EOS in row.tolist()
        end = row.tolist().index(EOS)
        assert (row[end + 1:] == PAD).all()
        text = vocab.decode_line(row)
        try:
            again = tokenize_text(vocab, text)
        except TokenizeError as exc:  # pragma: no cover - the assertion below reports it
            pytest.fail(f"decoded line {text!r} is not valid G-code for the vocabulary: {exc}")
        assert again == row.tolist(), text


def test_grammar_forces_eos_at_the_last_position():
    vocab = Vocabulary(max_tokens=3)
    grammar = Grammar(vocab, 1)
    always_command = {"type": np.array([[0.0, -9.0, 9.0, 0.0]]), "command": np.zeros((1, vocab.n_commands)),
                      "ptype": np.zeros((1, 10)), "exponent": np.zeros((1, 11)),
                      "digits": np.zeros((1, vocab.n_digits, 10))}
    out = [int(grammar.choose(always_command)[0]) for _ in range(3)]
    assert out[2] == EOS and out[0] != out[1]  # a command is never repeated
