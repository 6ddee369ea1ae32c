"""TSV-M (Gargiulo et al., CVPR 2025) against a hand computation of the paper's algorithm, and its properties.

The hand computation places each task's top k = ⌊r/N⌋ singular vectors in its
own block of r columns (zeros elsewhere), as the official code lays it out
(``compute_and_sum_svd_mem_reduction``), orthogonalises the r-column U and the r-row Vᵀ by their own SVDs
(P Qᵀ) and rebuilds U⊥ diag(σ) V⊥ᵀ, all in float64 with torch.linalg.svd.
The merge also runs in float64 and writes float32, so outputs agree to float32
rounding (atol 1e-6 on weights of order 0.1-1).
"""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import run_cli
from svd_merges import as_matrix64, load_plain, merge_and_compare

import hfmerge
from hfmerge.methods.tsv_m import orthogonalise


def tsv_by_hand(base, deltas):
    """The merged task matrix of one layer: block placement, SVD orthogonalisation of U and Vᵀ, rebuild."""
    count, rank = len(deltas), min(base.shape)
    k = rank // count
    u_all = torch.zeros(base.shape[0], rank, dtype=torch.float64)
    s_all = torch.zeros(rank, dtype=torch.float64)
    vt_all = torch.zeros(rank, base.shape[1], dtype=torch.float64)
    for i, delta in enumerate(deltas):
        u, s, vt = torch.linalg.svd(delta, full_matrices=False)
        u_all[:, i * k:(i + 1) * k] = u[:, :k]
        s_all[i * k:(i + 1) * k] = s[:k]
        vt_all[i * k:(i + 1) * k] = vt[:k]
    p, _, qt = torch.linalg.svd(u_all, full_matrices=False)
    p2, _, q2t = torch.linalg.svd(vt_all, full_matrices=False)
    return (p @ qt) @ torch.diag(s_all) @ (p2 @ q2t)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_tsv_m_matches_the_paper_by_hand(family, make_source, tmp_path):
    merge_and_compare(family, "tsv_m", make_source, tmp_path, tsv_by_hand, lam=0.7)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_merged_task_matrices_have_the_kept_singular_values(family, make_source, tmp_path):
    """U⊥ and V⊥ orthonormal ⇔ the singular values of U⊥ Σ V⊥ᵀ are exactly the N·k kept ones (and zeros)."""
    merged, sb, states, matrices = merge_and_compare(family, "tsv_m", make_source, tmp_path, tsv_by_hand, lam=1.0,
                                                     seeds=(4, 5))
    for name in matrices:
        base = as_matrix64(sb[name])
        rank = min(base.shape)
        kept = torch.cat([torch.linalg.svdvals(as_matrix64(s[name]) - base)[:rank // 2] for s in states])
        expected = torch.zeros(rank, dtype=torch.float64)
        expected[:len(kept)] = kept.sort(descending=True).values
        got = torch.linalg.svdvals(as_matrix64(merged[name]) - base)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=name)


def test_orthogonalise_gives_the_nearest_orthonormal_columns():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(12, 5, dtype=torch.float64, generator=generator)
    result = orthogonalise(matrix)
    torch.testing.assert_close(result.T @ result, torch.eye(5, dtype=torch.float64))
    # nearest in Frobenius norm: no other orthonormal 5 columns (random ones, or Gram-Schmidt's) come closer
    gram_schmidt = torch.linalg.qr(matrix).Q
    assert torch.linalg.norm(matrix - result) < torch.linalg.norm(matrix - gram_schmidt)
    for _ in range(20):
        other = torch.linalg.qr(torch.randn(12, 5, dtype=torch.float64, generator=generator)).Q
        assert torch.linalg.norm(matrix - result) < torch.linalg.norm(matrix - other)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(orthogonalise(matrix * signs), result * signs)


def test_one_source_gives_the_base_plus_lambda_times_its_task_vector(make_source, tmp_path):
    """N = 1: k = r, U and V are already orthonormal, so U⊥ Σ V⊥ᵀ = Δ₁ and the mean of one task vector is itself."""
    base, task = make_source("resnet", seed=0), make_source("resnet", seed=1)
    out = hfmerge.merge([str(task)], method="tsv_m", base=str(base), lambda_=0.6, progress=False).save(tmp_path / "o")
    sb, st = load_plain(base).state_dict(), load_plain(task).state_dict()
    for name, value in load_plain(out).state_dict().items():
        if not value.dtype.is_floating_point or name.endswith(("running_mean", "running_var")):
            assert torch.equal(value, st[name]), name
        else:
            expected = sb[name].double() + 0.6 * (st[name].double() - sb[name].double())
            torch.testing.assert_close(value, expected.float(), rtol=0, atol=1e-6, msg=name)


def test_a_matrix_whose_smaller_side_is_below_n_keeps_nothing_and_the_dry_run_says_so(make_source, tmp_path, capsys):
    """The ViT classifier is 3 × 32: rank 3 < N = 4, so k = 0 and it stays the base's (as the paper's code does)."""
    base = make_source("vit", seed=0)
    tasks = [make_source("vit", seed=s) for s in (1, 2, 3, 4)]
    result = hfmerge.merge([str(t) for t in tasks], method="tsv_m", base=str(base), progress=False)
    merged, sb = load_plain(result.save(tmp_path / "out")).state_dict(), load_plain(base).state_dict()
    assert result.details["unmerged"] == ["classifier.weight"]
    assert torch.equal(merged["classifier.weight"], sb["classifier.weight"])
    assert "1 matrix(es) with min(out, in) below 4 keep no triplet" in (tmp_path / "out" / "README.md").read_text()
    code, out, err = run_cli(["merge", *tasks, "--method", "tsv_m", "--base", base, "--dry-run"], capsys)
    assert code == 0, err
    assert "with min(out, in) below N = 4 keep no singular triplet and stay the base's: classifier.weight" in out + err


def test_tsv_m_by_repo_id_on_the_hub_equals_the_merge_of_the_folders(publish, make_source, tmp_path):
    folders = {"org/tsv-base": make_source("vit", seed=0),
               "org/tsv-a": make_source("vit", seed=1), "org/tsv-b": make_source("vit", seed=2)}
    for repo, folder in folders.items():
        publish(repo, folder)
    by_id = hfmerge.merge(["org/tsv-a", "org/tsv-b"], method="tsv_m", base="org/tsv-base", lambda_=0.8,
                          progress=False).save(tmp_path / "by-id")
    local = hfmerge.merge([str(folders["org/tsv-a"]), str(folders["org/tsv-b"])], method="tsv_m",
                          base=str(folders["org/tsv-base"]), lambda_=0.8, progress=False).save(tmp_path / "local")
    hub, here = load_plain(by_id).state_dict(), load_plain(local).state_dict()
    assert hub.keys() == here.keys()
    for name in hub:
        assert torch.equal(hub[name], here[name]), name
    assert "org/tsv-base" in str(yaml.safe_load((by_id / "hfmerge.yaml").read_text())["base"])


def test_tsv_m_on_the_command_line(make_source, tmp_path, capsys):
    base = make_source("resnet", seed=0)
    tasks = [make_source("resnet", seed=s) for s in (1, 2)]
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", *tasks, "--method", "tsv_m", "--base", base, "--lambda", "0.5", "--output", out,
                            "-q"], capsys)
    assert code == 0, err
    api = hfmerge.merge([str(t) for t in tasks], method="tsv_m", base=str(base), lambda_=0.5,
                        progress=False).save(tmp_path / "api")
    cli_state, api_state = load_plain(out).state_dict(), load_plain(api).state_dict()
    for name in api_state:
        assert torch.equal(cli_state[name], api_state[name]), name
    assert yaml.safe_load((out / "hfmerge.yaml").read_text())["parameters"]["lambda"] == 0.5
    card = (out / "README.md").read_text()
    assert "top k = ⌊r / 2⌋ singular triplets" in card and "λ = 0.5" in card
    assert "the mean of its task vectors scaled by the same λ" in card


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_bfloat16_sources_merge_to_bfloat16_and_identical_ones_to_the_base_bit_for_bit(method, make_source, tmp_path):
    """The SVDs run in float64 on the bfloat16 weights; the output keeps the sources' dtype, and zero Δ stays zero."""
    from hfmerge.testing.tiny import tiny_model

    base, other = (make_source("vit", model=tiny_model("vit", seed=s).to(torch.bfloat16)) for s in (0, 1))
    same = hfmerge.merge([str(base), str(base)], method=method, base=str(base), progress=False).save(tmp_path / "s")
    moved = hfmerge.merge([str(other), str(base)], method=method, base=str(base), progress=False).save(tmp_path / "m")
    sb = load_plain(base).state_dict()
    for name, value in load_plain(same).state_dict().items():
        assert value.dtype == sb[name].dtype and torch.equal(value, sb[name]), name
    merged = load_plain(moved).state_dict()
    assert merged["vit.layers.0.mlp.fc1.weight"].dtype == torch.bfloat16
    assert not torch.equal(merged["vit.layers.0.mlp.fc1.weight"], sb["vit.layers.0.mlp.fc1.weight"])
