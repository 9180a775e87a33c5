"""Factored LoRA geometry against dense numpy / scipy references, and `emscope geometry`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from typer.testing import CliRunner

from emscope.cli.main import app
from emscope.errors import EmscopeError
from emscope.geometry import (
    FIELDS,
    BaseWeights,
    aggregate_fields,
    analytic_signature,
    compare_adapters,
    compare_base,
    compare_modules,
    dense_compare,
    module_factors,
    open_adapter,
    random_comparisons,
    singular_subspace,
)
from emscope.lora import LoraAdapter, LoraModule

D_OUT, D_IN = 23, 17


def _module(
    rank: int,
    seed: int,
    d_out: int = D_OUT,
    d_in: int = D_IN,
    scale: float = 0.7,
    name: str = "model.layers.0.mlp.down_proj",
) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(d_out, rank, generator=g, dtype=torch.float64)
    return LoraModule(name, A, B, scale, alpha=scale * rank)


def _dense(m: LoraModule) -> np.ndarray:
    return m.scale * (m.B.double() @ m.A.double()).numpy()


def _scipy_angles(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sort(np.degrees(scipy.linalg.subspace_angles(x, y)))


def _top_k(d: np.ndarray, k: int) -> np.ndarray:
    return np.linalg.svd(d)[0][:, :k]


def _check_against_dense(m1: LoraModule, m2: LoraModule, k: int | None = None) -> None:
    c = compare_modules(m1, m2, k=k)
    d1, d2 = _dense(m1), _dense(m2)
    n1, n2 = np.linalg.norm(d1), np.linalg.norm(d2)
    assert c.norm_a == pytest.approx(n1, rel=1e-12)
    assert c.norm_b == pytest.approx(n2, rel=1e-12)
    assert c.cosine == pytest.approx(float(np.sum(d1 * d2)) / (n1 * n2), abs=1e-12)
    col = _scipy_angles(m1.B.double().numpy(), m2.B.double().numpy())
    row = _scipy_angles(m1.A.double().numpy().T, m2.A.double().numpy().T)
    assert len(c.principal_angles_deg) == min(m1.rank, m2.rank)
    np.testing.assert_allclose(c.principal_angles_deg, col, atol=1e-8)
    np.testing.assert_allclose(c.row_principal_angles_deg, row, atol=1e-8)
    kk = min(m1.rank, m2.rank) if k is None else min(k, m1.rank, m2.rank)
    assert c.k == kk
    u1, u2 = _top_k(d1, kk), _top_k(d2, kk)
    assert c.overlap == pytest.approx(np.sum((u1.T @ u2) ** 2) / kk, abs=1e-10)
    assert c.energy_overlap_ab == pytest.approx(np.sum((u2.T @ d1) ** 2) / n1**2, abs=1e-10)
    assert c.energy_overlap_ba == pytest.approx(np.sum((u1.T @ d2) ** 2) / n2**2, abs=1e-10)


@pytest.mark.parametrize("r1", range(1, 9))
def test_factored_matches_dense_and_scipy(r1: int) -> None:
    for r2 in (r1, 1 + (r1 * 5) % 8):
        _check_against_dense(_module(r1, seed=r1), _module(r2, seed=100 + r2, scale=2.5))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_overlap_matches_dense(k: int) -> None:
    _check_against_dense(_module(5, seed=1), _module(4, seed=2), k=k)


def test_dense_route_agrees_with_factored() -> None:
    m1, m2 = _module(3, 1), _module(6, 2)
    f, d = compare_modules(m1, m2), dense_compare(m1, m2)
    for name in FIELDS:
        np.testing.assert_allclose(f.fields()[name], d.fields()[name], atol=1e-9)


def test_gauge_invariance() -> None:
    m1, m2 = _module(4, 3), _module(4, 4)
    g = torch.Generator().manual_seed(9)
    M = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
    m1g = LoraModule(m1.name, torch.linalg.solve(M, m1.A), m1.B @ M, m1.scale, m1.alpha)
    assert np.allclose(_dense(m1g), _dense(m1))
    a, b = compare_modules(m1, m2), compare_modules(m1g, m2)
    for name in FIELDS:
        np.testing.assert_allclose(a.fields()[name], b.fields()[name], atol=1e-9)


def test_identical_updates() -> None:
    m = _module(6, 5)
    c = compare_modules(m, m)
    assert c.cosine == pytest.approx(1.0, abs=1e-12)
    assert max(c.principal_angles_deg) < 1e-6
    assert max(c.row_principal_angles_deg) < 1e-6
    assert c.overlap == pytest.approx(1.0, abs=1e-12)
    assert c.energy_overlap_ab == pytest.approx(1.0, abs=1e-12)


def test_orthogonal_constructions() -> None:
    eye = torch.eye(8, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 8, generator=g, dtype=torch.float64)
    # disjoint output coordinates: cosine 0, column angles 90, overlaps 0; same rows: 0 deg
    m1 = LoraModule("m", A, eye[:, :3], 1.0, 1.0)
    m2 = LoraModule("m", A, eye[:, 3:6], 1.0, 1.0)
    c = compare_modules(m1, m2)
    assert c.cosine == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(c.principal_angles_deg, [90.0] * 3, atol=1e-9)
    np.testing.assert_allclose(c.row_principal_angles_deg, [0.0] * 3, atol=1e-6)
    assert c.overlap == pytest.approx(0.0, abs=1e-12)
    assert c.energy_overlap_ab == pytest.approx(0.0, abs=1e-12)
    # same column space, orthogonal row spaces
    m3 = LoraModule("m", eye[:2], torch.randn(8, 2, generator=g, dtype=torch.float64), 1.0, 1.0)
    m4 = LoraModule("m", eye[2:4], m3.B, 1.0, 1.0)
    c = compare_modules(m3, m4)
    assert c.cosine == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(c.principal_angles_deg, [0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(c.row_principal_angles_deg, [90.0, 90.0], atol=1e-9)


def test_rank_deficient_factor_drops_null_directions() -> None:
    m = _module(4, 6)
    B = m.B.clone()
    B[:, 3] = B[:, 0] + B[:, 1]  # B has rank 3
    deficient = LoraModule(m.name, m.A, B, m.scale, m.alpha)
    other = _module(5, 7)
    f = module_factors(deficient)
    assert f.rank_b == 3 and f.deficient and "rank 3" in f.deficient
    c = compare_modules(deficient, other)
    ref = _scipy_angles(scipy.linalg.orth(B.numpy()), other.B.numpy())
    np.testing.assert_allclose(c.principal_angles_deg, ref, atol=1e-7)
    d = _dense(deficient)
    assert c.cosine == pytest.approx(
        float(np.sum(d * _dense(other))) / np.linalg.norm(d) / np.linalg.norm(_dense(other))
    )


def test_zero_update_gives_nan_not_a_crash() -> None:
    m = _module(2, 1)
    zero = LoraModule(m.name, m.A, torch.zeros_like(m.B), 1.0, 1.0)
    c = compare_modules(zero, m)
    assert math.isnan(c.cosine) and math.isnan(c.overlap)
    assert c.principal_angles_deg == ()
    assert module_factors(zero).norm == 0.0


def test_shape_mismatch_refused() -> None:
    with pytest.raises(EmscopeError, match="shapes differ"):
        compare_modules(_module(2, 1), _module(2, 2, d_out=D_OUT + 1))


def test_singular_subspace_matches_svd() -> None:
    m = _module(5, 8)
    U, s, V = singular_subspace(m, k=3)
    u, sd, vh = np.linalg.svd(_dense(m))
    np.testing.assert_allclose(s, sd[:3], rtol=1e-10)
    np.testing.assert_allclose(U @ U.T, u[:, :3] @ u[:, :3].T, atol=1e-10)
    np.testing.assert_allclose(V @ V.T, vh[:3].T @ vh[:3], atol=1e-10)


def test_base_cosine_blockwise_matches_dense() -> None:
    m = _module(3, 9)
    w0 = np.random.default_rng(0).standard_normal((D_OUT, D_IN))
    d = _dense(m)
    expected = float(np.sum(w0 * d)) / np.linalg.norm(w0) / np.linalg.norm(d)
    f = module_factors(m)
    assert compare_base(f, w0).cosine == pytest.approx(expected, abs=1e-12)
    blocks = [(i, w0[i : i + 5]) for i in range(0, D_OUT, 5)]
    assert compare_base(f, blocks).cosine == pytest.approx(expected, abs=1e-12)
    with pytest.raises(EmscopeError, match="rows"):
        compare_base(f, blocks[:-1])


def test_aggregate_weighting_by_hand() -> None:
    entries = [
        {
            "cosine": 0.5,
            "principal_angles_deg": [10.0, 20.0],
            "row_principal_angles_deg": [1.0],
            "mean_principal_angle_deg": 15.0,
            "overlap": 0.2,
            "energy_overlap_ab": 0.1,
            "energy_overlap_ba": 0.3,
        },
        {
            "cosine": -0.1,
            "principal_angles_deg": [30.0],
            "row_principal_angles_deg": [3.0, 5.0],
            "mean_principal_angle_deg": 30.0,
            "overlap": 0.6,
            "energy_overlap_ab": math.nan,
            "energy_overlap_ba": 0.5,
        },
    ]
    na, nb, inner = [1.0, 2.0], [3.0, 1.0], [1.5, -0.2]
    agg = aggregate_fields(entries, na, nb, inner)
    w = np.array([3.0, 2.0])
    assert agg["cosine"] == pytest.approx(1.3 / math.sqrt(5.0 * 10.0))
    assert agg["principal_angles_deg"] == pytest.approx([(30 + 60) / 5])
    assert agg["row_principal_angles_deg"] == pytest.approx([(3 + 6) / 5])
    assert agg["overlap"] == pytest.approx(float(w @ [0.2, 0.6]) / 5)
    assert agg["energy_overlap_ab"] == pytest.approx(0.1)  # NaN module left out
    flat = aggregate_fields(entries, na, nb, inner, weighted=False)
    assert flat["cosine"] == pytest.approx(0.2)
    assert flat["mean_principal_angle_deg"] == pytest.approx(22.5)


def test_aggregate_cosine_is_cosine_of_concatenated_updates(qwen) -> None:
    a, b = LoraAdapter.load(qwen.adapters["r4"]), LoraAdapter.load(qwen.adapters["pattern"])
    result = compare_adapters([a, b], random_draws=0)
    pair = result.pairs["r4|pattern"]
    shared = sorted(set(a.modules) & set(b.modules))
    va = np.concatenate([a.delta(m, torch.float64).numpy().ravel() for m in shared])
    vb = np.concatenate([b.delta(m, torch.float64).numpy().ravel() for m in shared])
    expected = float(va @ vb) / np.linalg.norm(va) / np.linalg.norm(vb)
    assert pair.aggregate()["cosine"] == pytest.approx(expected, abs=1e-12)
    for m in shared:  # rsLoRA + rank_pattern/alpha_pattern scales, different ranks per module
        _check_against_dense(a[m], b[m])
        assert pair.modules[m].rank_b == b[m].rank
    assert {b[m].rank for m in shared} == {2, 4}
    assert pair.unmatched == ()


def test_lazy_adapter_equals_eager_load(any_arch) -> None:
    for path in any_arch.adapters.values():
        eager, lazy = LoraAdapter.load(path), open_adapter(path)
        assert list(eager.modules) == list(lazy.modules)
        for name, m in eager.modules.items():
            n = lazy.modules[name]
            assert (m.scale, m.rank, m.embedding) == (n.scale, n.rank, n.embedding)
            assert torch.equal(m.A, n.A) and torch.equal(m.B, n.B)


def test_lazy_adapter_refuses_non_finite_and_integer_factors(qwen, tmp_path: Path) -> None:
    """The header-only open reads no value: each module is checked when it is read."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for file in qwen.adapters["r1"].iterdir():
        (bad / file.name).write_bytes(file.read_bytes())
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key].clone().fill_(float("nan"))
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    lazy = open_adapter(bad)
    name = next(iter(lazy.modules))
    with pytest.raises(EmscopeError, match=rf"module '{name}': lora_A has \d+ non-finite"):
        lazy.modules[name]
    tensors[key] = tensors[key].nan_to_num().to(torch.int64)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(EmscopeError, match=r"lora_A has dtype int64"):
        open_adapter(bad).modules[name]


def test_embedding_lora_roundtrip_and_geometry(tmp_path: Path) -> None:
    emb = _module(3, 1, d_out=11, d_in=7, name="model.embed_tokens")
    emb = LoraModule(emb.name, emb.A, emb.B, emb.scale, emb.alpha, embedding=True)
    lin = _module(3, 2)
    path = LoraAdapter(modules={emb.name: emb, lin.name: lin}, config={}).save(tmp_path / "e")
    lazy = open_adapter(path)
    assert lazy.modules[emb.name].embedding
    assert torch.allclose(lazy.modules[emb.name].delta(torch.float64), emb.delta(torch.float64))
    other = _module(2, 3, d_out=11, d_in=7, name="model.embed_tokens")
    _check_against_dense(lazy.modules[emb.name], other)


def test_baselines() -> None:
    sig = (400, 300, 4, 4, 4)
    an = analytic_signature(sig)
    assert an["overlap"] == pytest.approx(4 / 400)
    assert an["cosine_sd"] == pytest.approx(1 / math.sqrt(400 * 300))
    draws = random_comparisons([sig], draws=40, seed=3)[sig]
    again = random_comparisons([sig], draws=40, seed=3)[sig]
    assert [d.cosine for d in draws] == [d.cosine for d in again]
    overlaps = np.array([d.overlap for d in draws])
    assert abs(overlaps.mean() - 0.01) < 4 * overlaps.std() / math.sqrt(40)
    cos = np.array([d.cosine for d in draws])
    assert 0.5 < cos.std() / an["cosine_sd"] < 1.6
    emp_angle = np.mean([d.mean_principal_angle_deg for d in draws])
    assert emp_angle == pytest.approx(an["mean_principal_angle_deg"], abs=1.0)


# ---------------------------------------------------------------- shared initialisation

SHARED_D_OUT, SHARED_D_IN, SHARED_RANK = 48, 64, 4


def _pair_sharing_a(a_seed_1: int, a_seed_2: int, drift: float = 0.1) -> list[LoraAdapter]:
    """Two adapters over four down_proj modules with independent B; A drawn from
    ``a_seed_1`` / ``a_seed_2`` (equal seeds: the same A init), each moved by ``drift`` x
    an independent Gaussian (what training does to A)."""
    adapters = []
    for k, a_seed in enumerate((a_seed_1, a_seed_2)):
        g = torch.Generator().manual_seed(100 + k)  # B and the drift: independent per adapter
        modules = {}
        for layer in range(4):
            a0 = torch.randn(
                SHARED_RANK,
                SHARED_D_IN,
                generator=torch.Generator().manual_seed(1000 * a_seed + layer),
                dtype=torch.float64,
            )
            noise = torch.randn(a0.shape, generator=g, dtype=torch.float64)
            B = torch.randn(SHARED_D_OUT, SHARED_RANK, generator=g, dtype=torch.float64)
            name = f"model.layers.{layer}.mlp.down_proj"
            modules[name] = LoraModule(name, a0 + drift * noise, B, 1.0, alpha=SHARED_RANK)
        adapters.append(LoraAdapter(modules=modules, config={}, name=f"s{a_seed}_{k}"))
    return adapters


def test_shared_a_init_is_flagged_and_independent_inits_are_not() -> None:
    from emscope.geometry.analysis import SHARED_INIT_COSINE

    same = compare_adapters(_pair_sharing_a(1, 1), random_draws=0, dense=True)
    other = compare_adapters(_pair_sharing_a(1, 2), random_draws=0, dense=True)
    for result in (same, other):
        (pair,) = result.pairs.values()
        adapters = _pair_sharing_a(1, 1 if result is same else 2)
        for name, c in pair.modules.items():
            A1, A2 = adapters[0][name].A, adapters[1][name].A
            dense = float(torch.nn.functional.cosine_similarity(A1, A2, dim=1).mean())
            assert c.a_row_cosine == pytest.approx(dense, abs=1e-12)
            assert pair.dense is not None
            assert pair.dense[name].a_row_cosine == pytest.approx(dense, abs=1e-12)
            rows = _scipy_angles(A1.numpy().T, A2.numpy().T)  # row spaces, dense
            np.testing.assert_allclose(c.row_principal_angles_deg, rows, atol=1e-8)
            if result is same:
                assert max(rows) < 15.0  # the same row space, up to the drift
            else:
                assert min(rows) > 45.0
    flagged = same.shared_init()["s1_0|s1_1"]
    clean = other.shared_init()["s1_0|s2_1"]
    assert flagged["shared_init"] and not clean["shared_init"]
    assert flagged["a_row_cosine"] > 0.9 > SHARED_INIT_COSINE
    sd = math.sqrt(4 / (SHARED_RANK * SHARED_D_IN)) / 4
    assert clean["a_row_cosine_chance_sd"] == pytest.approx(sd)
    assert abs(clean["a_row_cosine"]) < 4 * sd
    assert flagged["row_overlap"] > 0.95 and clean["row_overlap"] < 0.3
    assert clean["row_overlap_chance"] == pytest.approx(SHARED_RANK / SHARED_D_IN)
    assert flagged["modules"] == clean["modules"] == 4
    (warning,) = same.shared_init_warnings()
    assert warning.startswith("s1_0|s1_1: the adapters share their LoRA initialisation")
    assert other.shared_init_warnings() == []
    assert same.to_json()["shared_init"]["pairs"]["s1_0|s1_1"]["shared_init"] is True
    # unequal ranks: no corresponding rows, so no statistic
    m1, m2 = _module(2, 1), _module(3, 1)
    assert math.isnan(compare_modules(m1, m2).a_row_cosine)


def test_same_seed_control_baseline() -> None:
    """Random factor pairs that share ONE A (the same seed on unrelated tasks): row angles 0,
    A rows cosine 1, cosine 0 on average with sd about 1/sqrt(d_out r)."""
    sig = (200, 300, 4, 4, 4)
    an = analytic_signature(sig)
    assert an["cosine_sd_same_seed"] == pytest.approx(1 / math.sqrt(200 * 4))
    assert analytic_signature((200, 300, 2, 4, 2))["cosine_sd_same_seed"] is None
    draws = random_comparisons([sig, (200, 300, 2, 4, 2)], draws=40, seed=3, shared_a=True)
    assert set(draws) == {sig}  # unequal ranks cannot share A
    for d in draws[sig]:
        assert d.a_row_cosine == pytest.approx(1.0)
        assert max(d.row_principal_angles_deg) < 1e-6
    cos = np.array([d.cosine for d in draws[sig]])
    assert abs(cos.mean()) < 4 * cos.std() / math.sqrt(40)
    assert 0.5 < cos.std() / an["cosine_sd_same_seed"] < 1.6
    independent = random_comparisons([sig], draws=40, seed=3)[sig]
    assert np.std([d.cosine for d in independent]) < cos.std() / 3  # shared A widens chance
    result = compare_adapters(_pair_sharing_a(1, 2), random_draws=3, seed=0)
    same_seed = result.baseline()["same_seed"]
    (key,) = result.pairs
    assert same_seed["empirical"]["draws"] == 3
    assert same_seed["empirical"]["pairs"][key]["a_row_cosine"]["mean"] == pytest.approx(1.0)
    assert same_seed["analytic"]["pairs"][key]["cosine"] == 0.0
    assert 0 < same_seed["analytic"]["pairs"][key]["cosine_sd"] < 1


def test_cli_warns_about_shared_init(tmp_path: Path) -> None:
    shared = _pair_sharing_a(1, 1)
    dirs = [a.save(tmp_path / name) for a, name in zip(shared, ("bad", "good"), strict=True)]
    independent = _pair_sharing_a(1, 2)[1].save(tmp_path / "other")
    res = _invoke(str(dirs[0]), str(dirs[1]), str(independent), "--random-draws", "2")
    assert res.exit_code == 0, res.output
    assert "warning: bad|good: the adapters share their LoRA initialisation" in res.stderr
    assert "bad|other" not in res.stderr and "good|other" not in res.stderr
    doc = json.loads(res.stdout)
    assert doc["shared_init"]["pairs"]["bad|good"]["shared_init"] is True
    assert doc["shared_init"]["pairs"]["bad|other"]["shared_init"] is False
    assert "bad|good" in doc["baseline"]["same_seed"]["empirical"]["pairs"]
    table = _invoke(str(dirs[0]), str(dirs[1]), "--format", "table")
    assert table.exit_code == 0 and "WARNING shared init: A rows cosine" in table.stdout


# ---------------------------------------------------------------- command line


def _invoke(*args: str):
    return CliRunner().invoke(app, ["geometry", *args])


def test_cli_json_layout_and_files(qwen, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r4, r1, pat = (str(qwen.adapters[n]) for n in ("r4", "r1", "pattern"))
    res = _invoke(r4, r1, pat, "--base", str(qwen.model), "--out", str(out), "--random-draws", "3")
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "geometry.json").read_text())
    assert set(doc) == {"pairs", "baseline", "base_cosine", "shared_init"}
    assert set(doc["pairs"]) == {"r4|r1", "r4|pattern", "r1|pattern"}
    pair = doc["pairs"]["r4|r1"]
    assert set(pair) == {"aggregate", "per_module", "unmatched"}
    assert set(pair["aggregate"]) == {*FIELDS, "unweighted"}
    assert set(pair["aggregate"]["unweighted"]) == set(FIELDS)
    assert list(pair["per_module"]) == ["model.layers.1.mlp.down_proj"]
    assert "model.layers.0.mlp.down_proj" in pair["unmatched"]
    for entry in pair["per_module"].values():
        assert set(entry) == set(FIELDS)
        assert entry["principal_angles_deg"] == sorted(entry["principal_angles_deg"])
    assert set(doc["baseline"]) == {"analytic", "empirical", "same_seed"}
    assert set(doc["shared_init"]["pairs"]) == set(doc["pairs"])
    assert not any(p["shared_init"] for p in doc["shared_init"]["pairs"].values())
    assert doc["baseline"]["empirical"]["draws"] == 3
    # base cosine against a dense reference from the model's own weights
    from safetensors.torch import load_file

    weights = load_file(str(qwen.model / "model.safetensors"))
    ada = LoraAdapter.load(qwen.adapters["r1"])
    m = "model.layers.1.mlp.down_proj"
    w0, d = weights[m + ".weight"].double(), ada.delta(m, torch.float64)
    expected = float((w0 * d).sum() / w0.norm() / d.norm())
    assert doc["base_cosine"]["r1"]["per_module"][m] == pytest.approx(expected, abs=1e-10)
    for name in ("geometry_cosine.png", "geometry_angle_spectra.png", "geometry_layer_cosine.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "geometry_modules.parquet").is_file()
    assert (out / "geometry_base.csv").is_file()


def test_cli_table_and_dense(qwen) -> None:
    res = _invoke(
        str(qwen.adapters["r4"]), str(qwen.adapters["pattern"]), "--format", "table", "--dense"
    )
    assert res.exit_code == 0, res.output
    assert "r4|pattern" in res.output and "MLP modules dominate" in res.output
    assert "dense check: max |cosine diff|" in res.output


def test_cli_json_to_stdout_with_k(qwen) -> None:
    res = _invoke(str(qwen.adapters["r4"]), str(qwen.adapters["pattern"]), "--k", "1")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert "base_cosine" not in doc
    entry = doc["baseline"]["analytic"]["per_signature"]
    assert all(v["k"] == 1 for v in entry.values())


def test_base_weights_sharded_index(qwen, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(qwen.model / "model.safetensors"))
    keys = sorted(weights)
    shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    index = {"weight_map": {}}
    for file, ks in shards.items():
        save_file({k: weights[k] for k in ks}, str(tmp_path / file))
        index["weight_map"].update(dict.fromkeys(ks, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    base = BaseWeights(tmp_path)
    name = "model.layers.0.self_attn.q_proj"
    blocks = list(base.row_blocks(name, rows=5))
    assert len(blocks) > 1
    np.testing.assert_array_equal(
        np.concatenate([b for _, b in blocks]), weights[name + ".weight"].double().numpy()
    )
    with pytest.raises(EmscopeError, match="no weight"):
        base.key("model.layers.0.nothing")


def _variant(src: Path, dst: Path, **changes: object) -> Path:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "lora_bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_cli_refuses_non_plain_lora(qwen, tmp_path: Path, change: dict, message: str) -> None:
    bad = _variant(qwen.adapters["r4"], tmp_path / "bad", **change)
    res = _invoke(str(qwen.adapters["pattern"]), str(bad))
    assert res.exit_code == 2
    assert message in res.output and "error:" in res.output


def test_cli_input_errors(qwen, tmp_path: Path) -> None:
    r4 = str(qwen.adapters["r4"])
    cases = [
        ((r4,), "at least two"),
        ((r4, str(qwen.adapters["r1"]), "--format", "xml"), "--format"),
        ((r4, str(qwen.adapters["r1"]), "--k", "0"), "--k"),
        ((r4, str(qwen.adapters["r1"]), "--random-draws", "-1"), "--random-draws"),
        ((r4, r4), "unique"),
        ((r4, str(tmp_path / "missing")), "not found"),
        ((r4, "--base", str(tmp_path)), "model.safetensors"),
    ]
    for args, message in cases:
        res = _invoke(*args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)


def test_cli_shape_mismatch(tmp_path: Path) -> None:
    a = LoraAdapter(modules={"m.x": _module(2, 1, name="m.x")}, config={}).save(tmp_path / "a")
    b = LoraAdapter(modules={"m.x": _module(2, 2, d_in=D_IN + 2, name="m.x")}, config={}).save(
        tmp_path / "b"
    )
    res = _invoke(str(a), str(b))
    assert res.exit_code == 2 and "shapes differ" in res.output
