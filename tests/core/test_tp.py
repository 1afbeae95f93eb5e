"""Tensor parallelism's mapping, head checks and the pure weight-slicing function."""

from __future__ import annotations

import numpy as np
import pytest

from llm2trt.core.errors import InputError
from llm2trt.core.tp import Heads, Mapping, Split, Units, feature_index, padded, shard, shard_vocab


def test_mapping_is_explicit_and_checked() -> None:
    assert [m.rank for m in Mapping.ranks(3)] == [0, 1, 2]
    assert Mapping.from_dict(Mapping(4, 3).to_dict()) == Mapping(4, 3)
    with pytest.raises(InputError, match="rank 2 is outside tp 2"):
        Mapping(2, 2)
    with pytest.raises(InputError, match="--tp must be at least 1"):
        Mapping(0, 0)


def test_head_checks_name_the_numbers() -> None:
    smollm2 = Heads(heads=9, kv_heads=3, head_dim=64)
    smollm2.check(3)
    with pytest.raises(InputError, match="--tp 2: 9 attention heads do not divide into 2 ranks"):
        smollm2.check(2)
    Heads(4, 2, 16).check(4)  # fewer KV heads than ranks: each KV head serves two ranks
    with pytest.raises(InputError, match="3 KV heads cannot be replicated evenly over 4 ranks"):
        Heads(12, 3, 16).check(4)
    with pytest.raises(InputError, match="6 KV heads do not divide into 4 ranks"):
        Heads(12, 6, 16).check(4)


def test_kv_heads_follow_the_query_heads() -> None:
    tiny = Heads(4, 2, 16)
    assert [list(tiny.kv_heads_of(m)) for m in Mapping.ranks(4)] == [[0], [0], [1], [1]]  # replicated
    assert [list(tiny.kv_heads_of(m)) for m in Mapping.ranks(2)] == [[0], [1]]
    assert [list(tiny.kv_heads_of(m)) for m in Mapping.ranks(1)] == [[0, 1]]
    smollm2 = Heads(9, 3, 64)
    assert [(list(smollm2.q_heads(m)), list(smollm2.kv_heads_of(m))) for m in Mapping.ranks(3)] == [
        ([0, 1, 2], [0]),
        ([3, 4, 5], [1]),
        ([6, 7, 8], [2]),
    ]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_and_row_shards_recompose_the_layer(tp: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 64))
    w_in, bias, w_out = rng.normal(size=(64, 128)), rng.normal(size=128), rng.normal(size=(128, 64))
    full = np.maximum(x @ w_in + bias, 0) @ w_out
    # Column-parallel then row-parallel, as gate/up then down: per-rank partial sums, one all-reduce.
    partial = [
        np.maximum(x @ shard(w_in, Split.COLUMN, m) + shard(bias, Split.COLUMN, m), 0) @ shard(w_out, Split.ROW, m)
        for m in Mapping.ranks(tp)
    ]
    assert np.allclose(sum(partial), full, rtol=1e-10, atol=1e-10)
    assert np.array_equal(np.concatenate([shard(w_in, Split.COLUMN, m) for m in Mapping.ranks(tp)], axis=1), w_in)
    assert shard(bias, Split.REPLICATE, Mapping(tp, 0)) is bias


def test_column_shards_take_whole_heads() -> None:
    heads, head_dim = Heads(4, 2, 16), 16
    wk = np.arange(64 * 32, dtype=np.float64).reshape(64, 32)  # k_proj: 2 KV heads of 16
    for m in Mapping.ranks(4):
        kv = heads.kv_heads_of(m)
        got = shard(wk, Split.COLUMN, m, feature_index(Units.KV, heads, m, 32))
        assert np.array_equal(got, wk[:, kv.start * head_dim : kv.stop * head_dim])
    # GPT-2's c_attn: q, k and v side by side; a rank takes its heads of each.
    qkv = np.arange(3 * 64)
    for m in Mapping.ranks(2):
        got = feature_index(Units.QKV, Heads(4, 4, 16), m, 3 * 64)
        assert np.array_equal(got, np.concatenate([qkv[s : s + 32] + 32 * m.rank for s in (0, 64, 128)]))
    with pytest.raises(InputError, match="48 features are not the 64 of q heads"):
        feature_index(Units.Q, heads, Mapping(2, 0), 48)
    with pytest.raises(InputError, match="--tp 3: 64 features do not divide into 3 ranks"):
        shard(np.zeros((8, 64)), Split.COLUMN, Mapping(3, 0))


def test_vocab_is_padded_to_a_multiple_of_tp() -> None:
    rng = np.random.default_rng(1)
    table = rng.normal(size=(1000, 8))  # vocab 1000 over 3 ranks: 1002 rows, 334 each
    assert padded(1000, 3) == 1002
    parts = [shard(table, Split.VOCAB, m) for m in Mapping.ranks(3)]
    assert [p.shape for p in parts] == [(334, 8)] * 3
    assert np.array_equal(np.concatenate(parts)[:1000], table) and not parts[2][-2:].any()
    lm_head = table.T  # [hidden, vocab]: logits split by columns, gathered, padding dropped
    h = rng.normal(size=(2, 8))
    logits = np.concatenate([h @ shard_vocab(lm_head, m, axis=1) for m in Mapping.ranks(3)], axis=1)[:, :1000]
    assert np.allclose(logits, h @ lm_head)


def test_qkv_by_head_takes_each_head_with_its_key_and_value() -> None:
    # BLOOM's query_key_value: head h owns [q_h, k_h, v_h], 3 * head_dim features in a row.
    heads = Heads(4, 4, 16)
    parts = [feature_index(Units.QKV_BY_HEAD, heads, m, 3 * 64) for m in Mapping.ranks(2)]
    assert np.array_equal(parts[0], np.arange(0, 96)) and np.array_equal(parts[1], np.arange(96, 192))
    quarters = [feature_index(Units.QKV_BY_HEAD, heads, m, 192) for m in Mapping.ranks(4)]
    assert [(int(q[0]), q.size) for q in quarters] == [(0, 48), (48, 48), (96, 48), (144, 48)]
    assert np.array_equal(np.concatenate(quarters), np.arange(192))
    with pytest.raises(InputError, match="128 features are not the 192 of qkv-by-head heads"):
        feature_index(Units.QKV_BY_HEAD, heads, Mapping(2, 0), 128)


def test_qkv_with_fewer_kv_heads_takes_q_then_its_k_and_v() -> None:
    # Phi-3's qkv_proj: 4 query heads, then 2 KV heads of k, then of v (16 each), 128 features.
    heads = Heads(4, 2, 16)
    got = [feature_index(Units.QKV, heads, m, 128) for m in Mapping.ranks(2)]
    assert np.array_equal(got[0], np.r_[0:32, 64:80, 96:112])
    assert np.array_equal(got[1], np.r_[32:64, 80:96, 112:128])
    # tp 4: one query head each, the KV head of its group replicated on two ranks.
    got = [feature_index(Units.QKV, heads, m, 128) for m in Mapping.ranks(4)]
    assert np.array_equal(got[1], np.r_[16:32, 64:80, 96:112])
    assert np.array_equal(got[2], np.r_[32:48, 80:96, 112:128])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_halves_split_each_half_evenly(tp: int) -> None:
    # Phi-3's gate_up_proj: gate's 128 columns then up's; a rank takes matching columns of both,
    # so gate * silu(up) pairs stay on one rank.
    size = 256
    parts = [feature_index(Units.HALVES, Heads(4, 2, 16), m, size) for m in Mapping.ranks(tp)]
    per = size // 2 // tp
    for m, part in zip(Mapping.ranks(tp), parts, strict=True):
        gate, up = part[:per], part[per:]
        assert np.array_equal(gate, np.arange(m.rank * per, (m.rank + 1) * per))
        assert np.array_equal(up, gate + size // 2)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(size))
    w = np.random.default_rng(0).normal(size=(8, size))
    x = np.random.default_rng(1).normal(size=(3, 8))
    full = x @ w
    whole = full[:, : size // 2] * full[:, size // 2 :]
    local = []
    for part in parts:
        y = x @ w[:, part]
        local.append(y[:, :per] * y[:, per:])  # the rank's chunk(2) of its own output
    assert np.allclose(np.concatenate(local, axis=1), whole)


def test_halves_refuse_what_does_not_split() -> None:
    with pytest.raises(InputError, match="255 features do not split into two equal parts"):
        feature_index(Units.HALVES, Heads(4, 2, 16), Mapping(2, 0), 255)
    with pytest.raises(InputError, match="--tp 4: 6 features do not divide into 4 ranks"):
        feature_index(Units.HALVES, Heads(4, 2, 16), Mapping(4, 0), 12)
