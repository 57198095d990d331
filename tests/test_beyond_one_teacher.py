"""Multi-teacher distillation, born-again generations and deep mutual learning."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import kdistill
from kdistill.cli import main
from kdistill.models.ensemble import TeacherEnsemble
from kdistill.tasks import MutualLearning


class Fixed(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.logits


def test_ensemble_target_is_the_weighted_average_of_soft_outputs():
    torch.manual_seed(0)
    a, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    T, w = 3.0, [1.0, 3.0]
    ens = TeacherEnsemble([Fixed(a), Fixed(b)], w, temperature=T)
    z = ens(torch.zeros(5, 1))
    expected = 0.25 * torch.softmax(a / T, 1) + 0.75 * torch.softmax(b / T, 1)
    torch.testing.assert_close(torch.softmax(z.double() / T, 1), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        TeacherEnsemble([Fixed(a)], [1.0, 2.0])


def test_mutual_learning_losses_follow_the_paper():
    torch.manual_seed(0)
    z = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    models = [Fixed(zi) for zi in z]
    task = MutualLearning(models, temperature=2.0, weight=1.0)
    batch = kdistill.data.loader.Batch(torch.zeros(4, 1), torch.tensor([0, 1, 2, 3]), torch.arange(4))
    _, losses = task(batch, 0.0)
    for k in range(3):
        kl = (
            sum(
                4.0 * F.kl_div(F.log_softmax(z[k] / 2, 1), F.softmax(z[j] / 2, 1), reduction="batchmean")
                for j in range(3)
                if j != k
            )
            / 2
        )
        torch.testing.assert_close(losses[f"dml_{k}"], kl)
        torch.testing.assert_close(losses[f"ce_{k}"], F.cross_entropy(z[k], batch.labels))
    # each model's KL term only moves that model: peers are detached targets
    losses["dml_0"].backward()
    assert z[1].grad is None and z[2].grad is None and z[0].grad is not None


@pytest.fixture(scope="module")
def small(mini):
    idx = torch.arange(0, len(mini.train_labels), 5)
    return dataclasses.replace(mini, train_images=mini.train_images[idx], train_labels=mini.train_labels[idx])


@pytest.mark.slow
def test_mutual_api_trains_every_model(small):
    torch.manual_seed(0)
    models = [kdistill.create_model("seed_student") for _ in range(2)]
    results = kdistill.mutual(models, small, epochs=3, batch_size=50, device="cpu", grad_clip=5.0)
    assert len(results) == 2
    for r in results:
        assert r.metrics["top1"] > 20  # chance is 10%


@pytest.mark.slow
def test_multi_teacher_born_again_and_mutual_from_the_cli(tmp_path, small, capsys):
    common = ["--output-dir", str(tmp_path), "--epochs", "2", "--set", "train.batch_size=50"]
    assert main(["train", "--model", "seed_teacher", "--name", "t1", *common]) == 0
    assert main(["train", "--model", "seed_student", "--name", "t2", "--seed", "1", *common]) == 0
    teachers = [str(tmp_path / n / "checkpoint.pt") for n in ("t1", "t2")]
    assert (
        main(
            [
                "distill",
                "--teacher",
                teachers[0],
                "--teacher",
                teachers[1],
                "--teacher-weights",
                "2",
                "1",
                "--name",
                "mt",
                *common,
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "mt" / "summary.json").read_text())
    assert summary["test"]["top1"] > 15 and "agreement" in summary

    assert main(["run", "--teacher-checkpoint", teachers[0], "--born-again", "2", "--name", "ban", *common]) == 0
    run = json.loads((tmp_path / "ban" / "summary.json").read_text())
    assert list(run["models"]) == ["teacher", "baseline", "distilled", "generation2", "generation3"]
    report = (tmp_path / "ban" / "report.md").read_text()
    assert "born-again generation 3" in report

    assert main(["mutual", "--models", "seed_student", "seed_student", "--name", "dml", *common]) == 0
    for i in range(2):
        assert json.loads((tmp_path / "dml" / f"model{i}" / "summary.json").read_text())["test"]["top1"] > 15


def test_a_mutual_checkpoint_says_which_model_evaluate_and_export_use(tmp_path, capsys):
    """evaluate/export/--teacher rebuild model 0 of a mutual-learning checkpoint: they say so."""
    from kdistill.checkpoint import load_model, save_checkpoint

    model = kdistill.create_model("seed_student")
    spec = {"name": "seed_student", "kwargs": {"num_classes": 10}}
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(
        {
            "kind": "mutual",
            "model_spec": spec,
            "peer_specs": [{**spec, "name": "seed_teacher"}],
            "model": model.state_dict(),
        },
        path,
    )
    load_model(path)
    err = capsys.readouterr().err
    assert "deep-mutual-learning checkpoint of 2 models; using model 0 (seed_student)" in err and "seed_teacher" in err
    save_checkpoint({"kind": "train", "model_spec": spec, "model": model.state_dict()}, path)
    load_model(path)
    assert "mutual" not in capsys.readouterr().err
