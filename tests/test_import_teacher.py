"""Importing a pretrained teacher: diffusers folders and python sources, their refusals, and the smoke chain
on an imported teacher (docs/methods.md §8). Fixtures are made here: random-weight UNets, scripted stand-ins."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.modelio import load_model
from pipeline.teachers import TeacherFolderError, import_teacher, save_teacher
from pipeline.teachers.conversion import VPVelocity
from tests.conftest import make_project, run

pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel  # noqa: E402

DIGITS = (1, 8, 8)
TEACHER_META = {"stage": "teacher", "kind": "flow", "data_shape": list(DIGITS), "default_sampler": "euler-4"}


def save_ddpm(
    folder: Path,
    classes: int | None,
    scheduler=None,
    channels: int = 1,
    size: int = 8,
    widths=(16, 32),  # noqa: ANN001
) -> Path:
    """A random-weight UNet2DModel + scheduler as DDPMPipeline.save_pretrained writes it (the check's fixture size)."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       num_class_embeds=classes, block_out_channels=widths, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=scheduler or DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def diffusers_source(folder: Path, prediction: str = "auto") -> dict:
    return {"kind": "diffusers", "path": str(folder), "prediction": prediction}


def edit_json(path: Path, **changes: object) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# A diffusers folder.


@pytest.mark.parametrize(("prediction_type", "expected"), [("epsilon", "epsilon"), ("v_prediction", "v"),
                                                           ("sample", "x0")])  # fmt: skip
def test_diffusers_folder_round_trips_with_its_prediction_type(
    tmp_path: Path, prediction_type: str, expected: str
) -> None:
    folder = save_ddpm(tmp_path / "ddpm", 10, DDPMScheduler(prediction_type=prediction_type))
    teacher = import_teacher(diffusers_source(folder), DIGITS, 10)
    assert isinstance(teacher.net, VPVelocity) and teacher.net.prediction == expected
    save_teacher(tmp_path / "teacher", teacher, TEACHER_META)
    loaded = load_model(tmp_path / "teacher")
    meta = loaded.meta
    assert meta["source"]["kind"] == "diffusers" and meta["source"]["scheduler"] == "DDPMScheduler"
    assert meta["prediction"] == prediction_type and meta["num_classes"] == 10 and meta["kind"] == "flow"
    assert "clamped outside" in meta["conversion"] and meta["t_range"][0] == pytest.approx(0.00631, abs=1e-4)
    x, t, label = torch.randn(6, *DIGITS), torch.linspace(0.05, 0.95, 6), torch.arange(6)
    torch.testing.assert_close(loaded.net(x, t, label), teacher.net(x, t, label))
    # The label reaches the UNet: another class gives another velocity.
    assert not torch.allclose(loaded.net(x, t, label), loaded.net(x, t, (label + 1) % 10))


def test_epsilon_teacher_is_the_formula_on_the_raw_unet(tmp_path: Path) -> None:
    """v = (x_t - eps)/t with eps the UNet's output at x_tau = x_t/r and the table's tau (here: between entries)."""
    folder = save_ddpm(tmp_path / "ddpm", 10)
    teacher = import_teacher(diffusers_source(folder), DIGITS, 10).net
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    x, t, label = torch.randn(4, *DIGITS), torch.tensor([0.1, 0.3, 0.6, 0.9]), torch.tensor([0, 3, 5, 9])
    _, tau = teacher.timestep(t)
    assert not torch.allclose(tau, tau.round())  # fractional timesteps, fed as they are
    r = (t.square() + (1 - t).square()).sqrt()[:, None, None, None]
    with torch.no_grad():
        eps = unet(x / r, tau.float(), class_labels=label).sample
        torch.testing.assert_close(teacher(x, t, label), (x - eps) / t[:, None, None, None], rtol=1e-4, atol=1e-4)


def test_flow_matching_folder_is_converted_directly(tmp_path: Path) -> None:
    folder = save_ddpm(tmp_path / "fm", 10, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000))
    teacher = import_teacher(diffusers_source(folder), DIGITS, 10)
    assert teacher.meta["prediction"] == "flow" and teacher.meta["t_range"] == [0.0, 1.0]
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    x, t, label = torch.randn(3, *DIGITS), torch.tensor([0.2, 0.5, 0.8]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        want = -unet(x, (1 - t) * 1000, class_labels=label).sample
        torch.testing.assert_close(teacher.net(x, t, label), want)


def test_unconditional_teacher_serves_one_label_and_makes_pairs(tmp_path: Path) -> None:
    from pipeline.pairs import PairStream, generate_pairs

    teacher = import_teacher(diffusers_source(save_ddpm(tmp_path / "ddpm", None)), DIGITS, 1)
    assert teacher.meta["num_classes"] == 1 and "unconditional" not in teacher.meta["conversion"]
    save_teacher(tmp_path / "teacher", teacher, TEACHER_META)
    loaded = load_model(tmp_path / "teacher")
    stats = generate_pairs(loaded.net, tmp_path / "pairs", 40, 20, 20, "euler-2", 1, DIGITS, 1, progress=False)
    assert stats.n_pairs == 40 and stats.nfe_mean == 2
    batch = next(iter(PairStream(tmp_path / "pairs", 8, 0)))
    assert batch.x.shape == (8, *DIGITS) and bool((batch.label == 0).all()) and bool(torch.isfinite(batch.x).all())


# Refusals: one line that names the file and what was expected.


def test_refuses_a_folder_without_its_config(tmp_path: Path) -> None:
    folder = save_ddpm(tmp_path / "ddpm", 10)
    (folder / "unet" / "config.json").unlink()
    with pytest.raises(TeacherFolderError, match=r"no unet/config.json or config.json") as caught:
        import_teacher(diffusers_source(folder), DIGITS, 10)
    assert str(folder) in str(caught.value) and "\n" not in str(caught.value)
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(TeacherFolderError, match=r"_class_name is None, expected 'UNet2DModel'"):
        import_teacher(diffusers_source(folder), DIGITS, 10)


def test_refuses_a_folder_without_its_scheduler(tmp_path: Path) -> None:
    folder = save_ddpm(tmp_path / "ddpm", 10)
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(TeacherFolderError, match=r"no scheduler/scheduler_config.json"):
        import_teacher(diffusers_source(folder), DIGITS, 10)


def test_refuses_an_unknown_prediction_type(tmp_path: Path) -> None:
    folder = save_ddpm(tmp_path / "ddpm", 10)
    edit_json(folder / "scheduler" / "scheduler_config.json", prediction_type="score")
    with pytest.raises(TeacherFolderError, match=r"scheduler_config.json: prediction_type 'score' is not a known"):
        import_teacher(diffusers_source(folder), DIGITS, 10)


@pytest.mark.parametrize(("channels", "size", "classes", "data_classes", "message"), [
    (3, 8, 10, 10, "in_channels is 3, the data have 1 channels"),
    (1, 16, 10, 10, "sample_size is 16, the data are 8x8"),
    (1, 8, 4, 10, "num_class_embeds is 4, the data have 10 classes"),
    (1, 8, None, 10, "unconditional .* the data have 10 classes"),
])  # fmt: skip
def test_refuses_a_unet_of_the_wrong_shape_for_the_data(
    tmp_path: Path, channels: int, size: int, classes: int | None, data_classes: int, message: str
) -> None:
    folder = save_ddpm(tmp_path / "ddpm", classes, channels=channels, size=size)
    with pytest.raises(TeacherFolderError, match=message) as caught:
        import_teacher(diffusers_source(folder), DIGITS, data_classes)
    assert "config.json" in str(caught.value)


def test_refuses_weights_that_do_not_fit_the_config(tmp_path: Path) -> None:
    folder = save_ddpm(tmp_path / "ddpm", 10)
    edit_json(folder / "unet" / "config.json", block_out_channels=[8, 16], norm_num_groups=4)
    with pytest.raises(TeacherFolderError, match=r"diffusion_pytorch_model.safetensors: weights do not fit"):
        import_teacher(diffusers_source(folder), DIGITS, 10)


# Python sources: what an EDM or official Rectified Flow user writes, on stand-ins with their call signatures.

STAND_INS = textwrap.dedent('''
    """Stand-ins with the real checkpoints' call signatures, exact for Gaussian data N(mu, 0.6^2 I)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    STD = 0.6


    class EDMPrecond(nn.Module):
        """EDM's call: net(x_sigma, sigma, class_labels one-hot) -> D(x; sigma)."""

        label_dim = 10

        def __init__(self):
            super().__init__()
            self.mu = nn.Parameter(torch.zeros(1, 8, 8))

        def forward(self, x, sigma, class_labels=None):
            sigma = sigma.reshape(-1, 1, 1, 1)
            return self.mu + STD**2 * (x - self.mu) / (STD**2 + sigma**2)


    class DDPMpp(nn.Module):
        """score_sde's call, as the Rectified Flow checkpoints use it: model(x_t, t * 999) -> x - z."""

        def __init__(self):
            super().__init__()
            self.mu = nn.Parameter(torch.zeros(1, 8, 8))

        def forward(self, x, timesteps):
            t = (timesteps / 999).reshape(-1, 1, 1, 1)
            var = t**2 * STD**2 + (1 - t) ** 2
            resid = x - t * self.mu
            return self.mu + t * STD**2 * resid / var - (1 - t) * resid / var
''')

EDM_USER = textwrap.dedent('''
    """What an EDM user writes (in real life: net = pickle.load(open(folder / "edm.pkl", "rb"))["ema"])."""
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from torch import nn

    from stand_ins import EDMPrecond


    class Labels(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, sigma, label):
            return self.net(x, sigma, F.one_hot(label, self.net.label_dim).to(x.dtype))


    def build(folder):
        net = EDMPrecond()
        if folder is not None:
            net.load_state_dict(load_file(folder / "edm.safetensors"))
        return Labels(net)
''')

RF_USER = textwrap.dedent('''
    """What an official Rectified Flow checkpoint user writes (score_sde format: model, ema, step)."""
    import torch
    from torch import nn

    from stand_ins import DDPMpp


    class SlimstepTime(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x, t, label):
            return self.model(x, t * 999)


    def build(folder):
        model = DDPMpp()
        if folder is not None:
            state = torch.load(folder / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
            model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        return SlimstepTime(model)
''')


def gaussian_mu() -> torch.Tensor:
    return torch.linspace(-0.8, 0.8, math.prod(DIGITS)).reshape(DIGITS)


def write_python_teacher(folder: Path, user_code: str) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "stand_ins.py").write_text(STAND_INS)
    (folder / "build.py").write_text(user_code)
    save_file({"mu": gaussian_mu()}, folder / "edm.safetensors")
    torch.save({"model": {"module.mu": gaussian_mu()}, "step": 0}, folder / "checkpoint.pth")
    return folder


def exact_rf_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t4, mu, std = t.reshape(-1, 1, 1, 1), gaussian_mu(), 0.6
    var = t4**2 * std**2 + (1 - t4) ** 2
    resid = x - t4 * mu
    return mu + t4 * std**2 * resid / var - (1 - t4) * resid / var


@pytest.mark.parametrize(("code", "prediction", "conditional"), [(EDM_USER, "edm", True), (RF_USER, "velocity", False)])
def test_python_source_stand_ins_give_the_exact_velocity(
    tmp_path: Path, code: str, prediction: str, conditional: bool
) -> None:
    folder = write_python_teacher(tmp_path / "user", code)
    source = {"kind": "python", "path": str(folder), "entry": "build.py:build", "prediction": prediction,
              "conditional": conditional, "sigma_min": 0.002, "sigma_max": 80.0, "schedule": {}}  # fmt: skip
    classes = 10 if conditional else 1
    teacher = import_teacher(source, DIGITS, classes)
    save_teacher(tmp_path / "teacher", teacher, TEACHER_META)
    assert sorted(p.name for p in (tmp_path / "teacher" / "code").iterdir()) == ["build.py", "stand_ins.py"]
    loaded = load_model(tmp_path / "teacher")  # rebuilt by build(None) from the copied code, weights from model.pt
    low, high = loaded.net.t_range
    t = torch.linspace(max(low, 0.02), min(high, 0.98), 50)
    x = torch.randn(50, *DIGITS, generator=torch.Generator().manual_seed(0))
    label = torch.arange(50) % classes
    torch.testing.assert_close(loaded.net(x, t, label), exact_rf_velocity(x, t), rtol=2e-4, atol=2e-4)
    assert loaded.meta["source"]["kind"] == "python" and loaded.meta["prediction"] == prediction


def test_python_source_refusals(tmp_path: Path) -> None:
    folder = write_python_teacher(tmp_path / "user", RF_USER)
    source = {"kind": "python", "path": str(folder), "entry": "build.py:make", "prediction": "velocity",
              "conditional": False, "sigma_min": 0.002, "sigma_max": 80.0, "schedule": {}}  # fmt: skip
    with pytest.raises(TeacherFolderError, match=r"build.py: no function 'make'"):
        import_teacher(source, DIGITS, 1)
    with pytest.raises(TeacherFolderError, match=r"conditional is false .* the data have 10 classes"):
        import_teacher({**source, "entry": "build.py:build"}, DIGITS, 10)
    with pytest.raises(TeacherFolderError, match=r"build.py:build: fails on data of shape \(1, 4, 4\)"):
        import_teacher({**source, "entry": "build.py:build"}, (1, 4, 4), 1)


# The command and the chain.


@pytest.mark.slow  # a whole project and several CLI processes (~13 s): end to end, not the fast lane
def test_import_teacher_command_writes_the_source_and_refuses_in_one_line(tmp_path: Path) -> None:
    repo = make_project(tmp_path / "repo")
    bad = save_ddpm(tmp_path / "bad", 10)
    edit_json(bad / "scheduler" / "scheduler_config.json", prediction_type="score")
    refused = run(["slimstep", "import-teacher", str(bad)], repo, env={"COLUMNS": "400"}, check=False)
    assert refused.returncode == 2 and len(refused.stdout.strip().splitlines()) == 1
    assert "scheduler_config.json: prediction_type 'score' is not a known prediction type" in refused.stdout
    user = write_python_teacher(tmp_path / "edm", EDM_USER)
    run(["slimstep", "import-teacher", str(user), "--entry", "build.py:build", "--prediction", "edm"], repo)
    source = yaml.safe_load((repo / "params.yaml").read_text())["teacher"]["source"]
    assert {k: source[k] for k in ("kind", "path", "entry", "prediction", "conditional", "sigma_max")} == {
        "kind": "python", "path": "inputs/teacher/edm", "entry": "build.py:build", "prediction": "edm",
        "conditional": True, "sigma_max": 80.0}  # fmt: skip
    assert "is valid" in run(["slimstep", "validate"], repo).stdout
    assert (repo / "inputs/teacher/edm/edm.safetensors").is_file()


@pytest.mark.slow
def test_smoke_chain_on_an_imported_diffusers_teacher(tmp_path: Path) -> None:
    """Import a random-weight DDPM folder; `dvc repro` wraps it (no training) and runs pairs -> students -> eval."""
    repo = make_project(tmp_path / "repo")
    run(["slimstep", "import-teacher", str(save_ddpm(tmp_path / "ddpm-cond", 10, widths=(8, 16)))], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())  # the smoke chain, lighter on a UNet teacher
    params["pairs"]["n_pairs"], params["eval"]["seeds"] = 1000, 1
    params["eval"]["teacher_samplers"] = ["euler-1", "euler-4", "heun-2"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert (repo / "inputs/teacher/ddpm-cond/unet/diffusion_pytorch_model.safetensors").is_file()
    out = run(["dvc", "repro"], repo).stdout
    assert "imported diffusers inputs/teacher/ddpm-cond" in out
    metrics = json.loads((repo / "metrics/teacher.json").read_text())
    assert metrics["trained_steps"] == 0 and metrics["source"] == "diffusers" and "final_loss" not in metrics
    meta = json.loads((repo / "models/teacher/meta.json").read_text())
    assert meta["source"]["kind"] == "diffusers" and meta["prediction"] == "epsilon"
    assert sorted(p.name for p in (repo / "models/teacher").iterdir()) == ["meta.json", "model.pt"]
    import pandas as pd

    board = pd.read_csv(repo / "reports/leaderboard.csv")
    assert {"teacher", "distill@fgd", "msd@ensemble", "anneal@slimflow"} <= set(board["model"])
    assert board.loc[board["model"] == "teacher", "params"].iloc[0] == metrics["params"]
    assert "up to date" in run(["dvc", "status"], repo).stdout
    assert "Running stage" not in run(["dvc", "repro"], repo).stdout


# Params and sizes.


def test_teacher_source_params_are_checked() -> None:
    from pipeline.config import ParamsError, validate_params
    from pipeline.profiles import render

    raw = render("smoke")
    assert validate_params(raw).teacher.source.kind == "train"
    cases = {
        "teacher.source.diffusers.path": {"kind": "diffusers", "path": "/abs/ddpm"},
        "teacher.source.python.entry": {"kind": "python", "path": "inputs/teacher/x", "entry": "build",
                                        "prediction": "edm"},
        "teacher.source.python.prediction": {"kind": "python", "path": "inputs/teacher/x", "entry": "b.py:build",
                                             "prediction": "score"},
    }  # fmt: skip
    for key, source in cases.items():
        with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
            validate_params({**raw, "teacher": {**raw["teacher"], "source": source}})


def test_paper_sizes_count_as_published() -> None:
    """DDPM's CIFAR-10 UNet rebuilt here has its published 35.7M parameters; teachers 35-62M, students 15-28M."""
    from pipeline.nets import build_net, count_params
    from pipeline.nets.sizes import CIFAR10, PAPER_SIZES

    counts = {size.name: count_params(build_net(size.spec, *CIFAR10)) / 1e6 for size in PAPER_SIZES}
    assert counts["ddpm"] == pytest.approx(35.7, abs=0.1)
    assert 35 < counts["ddpmpp"] < 62 and 15 < counts["student-16m"] < 17 and 26 < counts["student-28m"] < 29
