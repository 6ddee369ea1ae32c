"""Iso-C and Iso-CTS (Marczak et al., ICML 2025) against hand computations of the paper's formulas, and their properties.

The hand computations are written here in float64 with torch.linalg.svd:
Iso-C as σ̄ U Vᵀ of the summed task matrix; Iso-CTS with the task-specific
blocks placed first and the common block last in r columns, orthogonalised by
SVD (P Qᵀ), every direction scaled by the mean kept singular value. The merge
also runs in float64 and writes float32: outputs agree to float32 rounding
(atol 1e-6 on weights of order 0.1-1).
"""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import run_cli
from svd_merges import as_matrix64, load_plain, merge_and_compare

import hfmerge
from hfmerge.methods.iso import common_and_task_ranks


def iso_c_by_hand(base, deltas):
    u, s, vt = torch.linalg.svd(sum(deltas), full_matrices=False)
    return u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vt


def iso_cts_by_hand(base, deltas, fraction=0.8):
    count, rank = len(deltas), min(base.shape)
    common = int(rank * fraction)
    specific_total = round((rank - common) / count) * count
    common = rank - specific_total
    per_task = specific_total // count
    u, s, vt = torch.linalg.svd(sum(deltas), full_matrices=False)
    u_all = torch.zeros(base.shape[0], rank, dtype=torch.float64)
    s_all = torch.zeros(rank, dtype=torch.float64)
    vt_all = torch.zeros(rank, base.shape[1], dtype=torch.float64)
    for i, delta in enumerate(deltas):
        projected = delta - u[:, :common] @ u[:, :common].T @ delta
        ut, st, vtt = torch.linalg.svd(projected, full_matrices=False)
        u_all[:, i * per_task:(i + 1) * per_task] = ut[:, :per_task]
        s_all[i * per_task:(i + 1) * per_task] = st[:per_task]
        vt_all[i * per_task:(i + 1) * per_task] = vtt[:per_task]
    u_all[:, specific_total:] = u[:, :common]
    s_all[specific_total:] = s[:common]
    vt_all[specific_total:] = vt[:common]
    p, _, qt = torch.linalg.svd(u_all, full_matrices=False)
    p2, _, q2t = torch.linalg.svd(vt_all, full_matrices=False)
    return float(s_all.mean()) * (p @ qt) @ (p2 @ q2t)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_iso_c_matches_the_paper_by_hand(family, make_source, tmp_path):
    merge_and_compare(family, "iso_c", make_source, tmp_path, iso_c_by_hand, lam=0.7)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_iso_cts_matches_the_paper_by_hand(family, make_source, tmp_path):
    merge_and_compare(family, "iso_cts", make_source, tmp_path, iso_cts_by_hand, lam=0.7)


def test_iso_cts_with_another_common_fraction(make_source, tmp_path):
    merge_and_compare("vit", "iso_cts", make_source, tmp_path, lambda b, d: iso_cts_by_hand(b, d, 0.5), lam=1.3,
                      common_fraction=0.5)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_every_merged_task_matrix_is_isotropic(method, make_source, tmp_path):
    """All r singular values of the merged task matrix are one value: the factors rebuilt are orthonormal."""
    formula = iso_c_by_hand if method == "iso_c" else iso_cts_by_hand
    merged, sb, _, matrices = merge_and_compare("resnet", method, make_source, tmp_path, formula, lam=1.0,
                                                seeds=(4, 5, 6))
    for name in matrices:
        base = as_matrix64(sb[name])
        values = torch.linalg.svdvals(as_matrix64(merged[name]) - base)
        assert values.min() > 0, name
        torch.testing.assert_close(values, torch.full_like(values, float(values.mean())), rtol=0, atol=2e-6, msg=name)


def test_common_fraction_one_is_iso_c(make_source, tmp_path):
    base = make_source("vit", seed=0)
    tasks = [str(make_source("vit", seed=s)) for s in (1, 2)]
    iso_c = hfmerge.merge(tasks, method="iso_c", base=str(base), progress=False).save(tmp_path / "c")
    full = hfmerge.merge(tasks, method="iso_cts", base=str(base), parameters={"common_fraction": 1.0},
                         progress=False).save(tmp_path / "cts")
    first, second = load_plain(iso_c).state_dict(), load_plain(full).state_dict()
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(("rank", "count", "fraction"), [(32, 3, 0.8), (8, 3, 0.8), (3, 3, 0.8), (768, 8, 0.8),
                                                         (768, 20, 0.8), (64, 2, 0.5), (10, 4, 0.0)])
def test_common_and_task_ranks_are_the_official_split(rank, count, fraction):
    """c + N·s = r, with c and s as the official code computes them (``iso_cts`` in danielm1405/iso-merging)."""
    official_common = rank - round((rank - int(rank * fraction)) / count) * count
    assert common_and_task_ranks(rank, count, fraction) == (official_common, (rank - official_common) // count)


def test_common_and_task_ranks_never_go_negative():
    """r = 11, N = 4, fraction 0: the official code gets c = 11 − round(11/4)·4 = −1; the cap s ≤ ⌊r/N⌋ keeps c ≥ 0."""
    common, per_task = common_and_task_ranks(11, 4, 0.0)
    assert (common, per_task) == (11 - 4 * (11 // 4), 11 // 4)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_iso_by_repo_id_on_the_hub_equals_the_merge_of_the_folders(method, publish, make_source, tmp_path):
    folders = {f"org/{method}-base": make_source("resnet", seed=0),
               f"org/{method}-a": make_source("resnet", seed=1), f"org/{method}-b": make_source("resnet", seed=2)}
    for repo, folder in folders.items():
        publish(repo, folder)
    base, *tasks = folders
    by_id = hfmerge.merge(tasks, method=method, base=base, lambda_=1.5, progress=False).save(tmp_path / "by-id")
    local = hfmerge.merge([str(folders[t]) for t in tasks], method=method, base=str(folders[base]), lambda_=1.5,
                          progress=False).save(tmp_path / "local")
    hub, here = load_plain(by_id).state_dict(), load_plain(local).state_dict()
    assert hub.keys() == here.keys()
    for name in hub:
        assert torch.equal(hub[name], here[name]), name


def test_iso_cts_on_the_command_line(make_source, tmp_path, capsys):
    base = make_source("vit", seed=0)
    tasks = [make_source("vit", seed=s) for s in (1, 2, 3)]
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", *tasks, "--method", "iso_cts", "--base", base, "--lambda", "1.2", "--param",
                            "common_fraction=0.6", "--output", out, "-q"], capsys)
    assert code == 0, err
    api = hfmerge.merge([str(t) for t in tasks], method="iso_cts", base=str(base), lambda_=1.2,
                        parameters={"common_fraction": 0.6}, progress=False).save(tmp_path / "api")
    cli_state, api_state = load_plain(out).state_dict(), load_plain(api).state_dict()
    for name in api_state:
        assert torch.equal(cli_state[name], api_state[name]), name
    assert yaml.safe_load((out / "hfmerge.yaml").read_text())["parameters"] == {"lambda": 1.2, "common_fraction": 0.6}
    card = (out / "README.md").read_text()
    assert "⌊0.6 · r⌋" in card and "λ = 1.2" in card and "the 3 tasks" in card
