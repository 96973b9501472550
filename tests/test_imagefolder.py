"""Image folders → uint8 .npz: class folders, flat folders, mixed sizes, bad files, empty folders, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data import load_npz_split, load_split, save_split
from pipeline.imagefolder import ImageFolderError, read_image_folder, write_npz
from pipeline.profiles import render_text


def _png(path: Path, size: tuple[int, int], colour: tuple[int, int, int] | int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    for i, size in enumerate([(20, 30), (40, 20), (16, 16)]):  # mixed sizes and aspect ratios
        _png(root / "cat" / f"{i}.png", size, (200, 10, 10))
        _png(root / "dog" / f"{i}.jpg", size, (10, 10, 200))
    return root


@pytest.fixture
def flat_folder(tmp_path: Path) -> Path:
    root = tmp_path / "faces"
    for i in range(30):
        _png(root / f"{i:02d}.png", (12 + i, 18), (i * 8, 100, 50))
    return root


def test_class_folders_become_labelled_uint8_images(class_folder: Path) -> None:
    images = read_image_folder(class_folder, size=8)
    assert images.images.shape == (6, 3, 8, 8) and images.images.dtype == np.uint8
    assert images.class_names == ["cat", "dog"] and images.labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(images.images[:3, 0], 200, atol=2)  # red cats, JPEG rounding aside
    np.testing.assert_allclose(images.images[3:, 2], 200, atol=3)


def test_centre_crop_keeps_the_middle_of_a_wide_image(tmp_path: Path) -> None:
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :10, 0], wide[:, 10:20, 1], wide[:, 20:, 2] = 255, 255, 255  # red | green | blue thirds
    (tmp_path / "flat").mkdir()
    Image.fromarray(wide).save(tmp_path / "flat" / "wide.png")
    pixels = read_image_folder(tmp_path / "flat", size=10).images[0]
    assert pixels[1].min() == 255 and pixels[0].max() == 0 and pixels[2].max() == 0  # all green


def test_grayscale_is_detected_and_can_be_forced_to_rgb(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / "g" / f"{i}.png", (9, 9), 40 * i, mode="L")
    assert read_image_folder(tmp_path / "g", size=6).images.shape == (3, 1, 6, 6)
    rgb = read_image_folder(tmp_path / "g", size=6, channels=3).images
    assert rgb.shape == (3, 3, 6, 6) and np.array_equal(rgb[:, 0], rgb[:, 2])


def test_flat_folder_is_unconditional_through_split_save_and_load(flat_folder: Path, tmp_path: Path) -> None:
    images = read_image_folder(flat_folder, size=8)
    assert images.labels is None and not images.conditional
    write_npz(images, tmp_path / "faces.npz")
    with np.load(tmp_path / "faces.npz", allow_pickle=False) as arrays:
        assert sorted(arrays.files) == ["images"] and arrays["images"].dtype == np.uint8
    split = load_npz_split(tmp_path / "faces.npz", heldout=6, seed=0)
    assert (len(split.train), len(split.test), split.train.num_classes) == (24, 6, 1)
    assert not split.train.conditional and set(split.train.labels.tolist()) == {0}
    save_split(split, tmp_path / "data")
    again = load_split(tmp_path / "data")
    assert not again.train.conditional and again.train.class_names is None


def test_class_names_survive_the_npz_and_data_meta(class_folder: Path, tmp_path: Path) -> None:
    write_npz(read_image_folder(class_folder, size=8), tmp_path / "pets.npz")
    split = load_npz_split(tmp_path / "pets.npz", heldout=2, seed=0)
    assert split.train.conditional and split.train.class_names == ["cat", "dog"]
    assert sorted(split.test.labels.tolist()) == [0, 1]  # stratified
    save_split(split, tmp_path / "data")
    assert load_split(tmp_path / "data").test.class_names == ["cat", "dog"]


def test_a_corrupt_file_is_named_or_skipped_and_counted(flat_folder: Path) -> None:
    (flat_folder / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageFolderError, match=r"broken\.png: not a readable image.*--skip-bad"):
        read_image_folder(flat_folder, size=8)
    images = read_image_folder(flat_folder, size=8, skip_bad=True)
    assert len(images.images) == 30 and [p.name for p in images.skipped] == ["broken.png"]


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "empty folder"),
        ({"notes.txt": b"hi", "data.csv": b"1,2"}, "no image files"),
        ({"a.png": None, "sub/b.png": None}, "both images"),
        ({"sub/readme.txt": b"x"}, "class folder without image files"),
    ],
)
def test_folders_that_are_not_data_sets_get_one_line(tmp_path: Path, layout: dict, message: str) -> None:
    root = tmp_path / "in"
    root.mkdir()
    for name, content in layout.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            _png(root / name, (5, 5), (1, 2, 3))
        else:
            (root / name).write_bytes(content)
    with pytest.raises(ImageFolderError, match=message) as caught:
        read_image_folder(root, size=8)
    assert "\n" not in str(caught.value)


def _cli(repo: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str]:
    monkeypatch.chdir(repo)
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A folder with the smoke params.yaml: all `import-data` reads and writes besides inputs/."""
    root = tmp_path / "repo"
    root.mkdir()
    (root / "params.yaml").write_text(render_text("smoke", Path(__file__).parents[1] / "configs"))
    return root


def test_cli_imports_a_flat_folder_and_points_params_at_it(
    flat_folder: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = _cli(repo, monkeypatch, "import-data", str(flat_folder), "--size", "8")
    assert code == 0, out
    assert "30 images 3x8x8" in out and "unconditional" in out
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["data"]["dataset"] == "npz" and params["data"]["path"] == "inputs/faces.npz"
    assert params["data"]["heldout"] == 6 and params["msd"]["students"] == [0]
    assert load_npz_split(repo / "inputs/faces.npz", 6, 0).train.shape == (3, 8, 8)


def test_cli_refuses_an_image_folder_without_size_and_names_bad_files(
    flat_folder: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = _cli(repo, monkeypatch, "import-data", str(flat_folder))
    assert code == 2 and "needs --size N" in out
    (flat_folder / "bad.jpg").write_bytes(b"nope")
    code, out = _cli(repo, monkeypatch, "import-data", str(flat_folder), "--size", "8")
    assert code == 2 and "bad.jpg: not a readable image" in out
    code, out = _cli(repo, monkeypatch, "import-data", str(flat_folder), "--size", "8", "--skip-bad")
    assert code == 0 and "skipped 1 unreadable file" in out
