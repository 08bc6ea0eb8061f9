"""Dataset loaders: every publisher's layout, built small in tmp_path, plus the real data.

The real data lives in ``../shared/data`` beside the checkout (``$KANOCLIP_SHARED_DIR/data``
when that is set; the ``shared_data`` fixture of conftest.py); its tests are skipped,
saying why, when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kanoclip.data import (
    KINDS,
    Sample,
    detect_kind,
    group_by_class,
    load_dataset,
    load_mask,
    parse_data_arg,
    summarize,
    verify_images,
)
from kanoclip.errors import DatasetError, InputError


def image(path: Path, value: int = 0, size: int = 8, mode: str = "L") -> Path:
    """Write a ``size`` x ``size`` image filled with ``value`` (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value).save(path)
    return path


def mask(path: Path, box: tuple[int, int, int, int] = (2, 2, 5, 5), on: int = 255, size: int = 8) -> Path:
    """Write a mask that is ``on`` inside ``box`` (x0, y0, x1, y1, exclusive) and 0 elsewhere."""
    values = np.zeros((size, size), np.uint8)
    x0, y0, x1, y1 = box
    values[y0:y1, x0:x1] = on
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)
    return path


def counts(samples: list[Sample]) -> dict[str, dict[str, int]]:
    return summarize(samples)


def one_line_error(error: pytest.ExceptionInfo[BaseException], *needles: str) -> str:
    """Check the error's message is one line holding every one of ``needles``."""
    text = str(error.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text
    return text


def load_error(kind: str, root: Path, *needles: str) -> str:
    """``load_dataset(kind, root)`` raises a one-line DatasetError holding ``needles``."""
    with pytest.raises(DatasetError) as error:
        load_dataset(kind, root)
    return one_line_error(error, *needles)


# ------------------------------------------------------------------- layouts


def make_mvtec(root: Path, categories: tuple[str, ...] = ("bottle", "metal_nut")) -> Path:
    for cat in categories:
        for n in range(2):
            image(root / cat / "test" / "good" / f"{n:03d}.png")
        for n in range(3):
            image(root / cat / "test" / "crack" / f"{n:03d}.png", 50)
            mask(root / cat / "ground_truth" / "crack" / f"{n:03d}_mask.png")
        image(root / cat / "test" / "scratch" / "000.png", 60)
        mask(root / cat / "ground_truth" / "scratch" / "000_mask.png")
        (root / cat / "license.txt").write_text("x")
    (root / "readme.txt").write_text("x")
    return root


def test_mvtec_layout(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec_anomaly_detection")
    assert detect_kind(root) == "mvtec"
    samples = load_dataset("mvtec", root)
    assert counts(samples) == {
        "bottle": {"n_normal": 2, "n_anomalous": 4, "n_masks": 4},
        "metal_nut": {"n_normal": 2, "n_anomalous": 4, "n_masks": 4},
    }
    crack = [s for s in samples if s.defect == "crack" and s.class_name == "bottle"]
    assert [s.image.name for s in crack] == ["000.png", "001.png", "002.png"]
    assert crack[1].mask == root / "bottle" / "ground_truth" / "crack" / "001_mask.png"
    good = [s for s in samples if s.label == 0]
    assert all(s.defect == "good" and s.mask is None and s.dataset == "mvtec" for s in good)
    assert load_dataset(None, root) == samples


def test_mvtec_single_category_and_wrapper_folder(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec", ("bottle",))
    one = load_dataset("mvtec", root / "bottle")
    assert counts(one) == {"bottle": {"n_normal": 2, "n_anomalous": 4, "n_masks": 4}}
    assert detect_kind(root / "bottle") == "mvtec"
    assert load_dataset(None, tmp_path) == one  # tmp_path only wraps the dataset folder


def test_mvtec_missing_mask_is_an_error(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "m", ("bottle",))
    (root / "bottle" / "ground_truth" / "crack" / "002_mask.png").unlink()
    load_error("mvtec", root, "002.png", "no mask", "ground_truth")


def test_mpdd_layout_and_detection(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "MPDD", ("bracket_black", "tubes"))
    assert detect_kind(root) == "mpdd"
    samples = load_dataset("mpdd", root)
    assert set(group_by_class(samples)) == {"bracket_black", "tubes"}
    assert {s.dataset for s in samples} == {"mpdd"}
    assert summarize(samples)["tubes"] == {"n_normal": 2, "n_anomalous": 4, "n_masks": 4}


def test_visa_layout_uses_test_rows_and_reads_0_1_masks(tmp_path: Path) -> None:
    root = tmp_path / "VisA"
    rows = ["object,split,label,image,mask"]
    for n in range(3):
        rel = f"candle/Data/Images/Normal/{n:04d}.JPG"
        image(root / rel)
        rows.append(f"candle,{'train' if n == 0 else 'test'},normal,{rel},")
    for n in range(2):
        rel, mrel = f"candle/Data/Images/Anomaly/{n:03d}.JPG", f"candle/Data/Masks/Anomaly/{n:03d}.png"
        image(root / rel, 80)
        mask(root / mrel, on=1)  # VisA stores masks as 0/1
        rows.append(f"candle,test,anomaly,{rel},{mrel}")
    image(root / "pcb1/Data/Images/Normal/0000.JPG")
    rows.append("pcb1,test,normal,pcb1/Data/Images/Normal/0000.JPG,")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    assert detect_kind(root) == "visa"
    samples = load_dataset("visa", root)
    assert counts(samples) == {
        "candle": {"n_normal": 2, "n_anomalous": 2, "n_masks": 2},
        "pcb1": {"n_normal": 1, "n_anomalous": 0, "n_masks": 0},
    }
    anomalous = next(s for s in samples if s.label)
    assert load_mask(anomalous, (8, 8)).sum() == 9  # 0/1 mask still has its 3x3 defect

    (root / "candle/Data/Masks/Anomaly/001.png").unlink()
    load_error("visa", root, "001.JPG", "no mask")


def test_btad_layout_matches_masks_by_stem(tmp_path: Path) -> None:
    root = tmp_path / "BTech_Dataset_transformed"
    image(root / "01/test/ok/0000.bmp")
    image(root / "01/test/ko/0001.bmp", 90)
    mask(root / "01/ground_truth/ko/0001.png")
    image(root / "02/test/ok/0000.png")
    image(root / "02/test/ko/0003.png", 90)
    mask(root / "02/ground_truth/ko/0003.png")
    image(root / "03/test/ok/0000.bmp")
    image(root / "03/test/ko/0005.bmp", 90)
    mask(root / "03/ground_truth/ko/0005.bmp")
    assert detect_kind(root) == "btad"
    samples = load_dataset("btad", root)
    assert list(group_by_class(samples)) == ["01", "02", "03"]
    assert all(v == {"n_normal": 1, "n_anomalous": 1, "n_masks": 1} for v in counts(samples).values())
    assert next(s for s in samples if s.class_name == "03" and s.label).mask.name == "0005.bmp"
    assert {s.defect for s in samples} == {"good", ""}


def test_sdd_layout_labels_from_masks(tmp_path: Path) -> None:
    root = tmp_path / "KolektorSDD"
    for kos in ("kos01", "kos02", "kos10"):
        image(root / kos / "Part0.jpg")
        mask(root / kos / "Part0_label.bmp", on=0)  # defect-free: an all-zero label
        image(root / kos / "Part1.jpg")
        mask(root / kos / "Part1_label.bmp")
    assert detect_kind(root) == "sdd"
    samples = load_dataset("sdd", root)
    assert counts(samples) == {"electrical_commutator": {"n_normal": 3, "n_anomalous": 3, "n_masks": 3}}
    assert [s.image.parent.name for s in samples][-2:] == ["kos10", "kos10"]  # natural order
    assert all((s.mask is not None) == bool(s.label) for s in samples)
    (root / "kos02" / "Part1_label.bmp").unlink()
    load_error("sdd", root, "Part1.jpg", "label")


def make_dagm(root: Path, classes: tuple[int, ...] = (1, 2, 10)) -> Path:
    for c in classes:
        test = root / f"Class{c}" / "Test"
        image(test / "0001.PNG")
        image(test / "0002.PNG", 40)
        mask(test / "Label" / "0002_label.PNG")
        (test / "Label" / "Labels.txt").write_text("2\n1\t0\t0001.PNG\t0\t0\n2\t1\t0002.PNG\t0\t0002_label.PNG\n")
        image(root / f"Class{c}" / "Train" / "0001.PNG")
    image(root / "Class1_def" / "1.png")
    return root


def test_dagm_layout(tmp_path: Path) -> None:
    root = make_dagm(tmp_path / "DAGM")
    assert detect_kind(root) == "dagm"
    samples = load_dataset("dagm", root)
    assert list(group_by_class(samples)) == ["Class1", "Class2", "Class10"]
    assert all(v == {"n_normal": 1, "n_anomalous": 1, "n_masks": 1} for v in counts(samples).values())
    assert next(s for s in samples if s.label).mask.name == "0002_label.PNG"
    image(root / "Class2" / "Test" / "0003.PNG")
    load_error("dagm", root, "0003.PNG", "Labels.txt")


@pytest.mark.parametrize("yes, no", [("yes", "no"), ("YES", "NO")])
def test_brainmri_layout(tmp_path: Path, yes: str, no: str) -> None:
    root = tmp_path / "brain_mri"
    for n in range(3):
        image(root / yes / f"Y{n + 1}.jpg")
    for name in ("N1.JPG", "no 2.jpeg", "3 no.jpg"):
        image(root / no / name)
    assert detect_kind(root) == "brainmri"
    samples = load_dataset("brainmri", root)
    assert counts(samples) == {"brain": {"n_normal": 3, "n_anomalous": 3, "n_masks": 0}}


def test_brain_parent_folder_and_br35h_detection(tmp_path: Path) -> None:
    parent = tmp_path / "archive"
    for n in range(2):
        image(parent / "brain_tumor_dataset" / "yes" / f"Y{n}.jpg")
        image(parent / "brain_tumor_dataset" / "no" / f"N{n}.jpg")
    assert detect_kind(parent) == "brainmri"
    assert len(load_dataset("brainmri", parent)) == 4

    br35h = tmp_path / "Br35H"
    for n in range(3):
        image(br35h / "yes" / f"y{n}.jpg")
        image(br35h / "no" / f"no{n}.jpg")
        image(br35h / "pred" / f"pred{n}.jpg")
    assert detect_kind(br35h) == "br35h"
    samples = load_dataset("br35h", br35h)
    assert counts(samples) == {"brain": {"n_normal": 3, "n_anomalous": 3, "n_masks": 0}}  # pred/ unused


def make_bmad(root: Path) -> Path:
    for n in range(2):
        image(root / "test/good/img" / f"{n}.png")
        image(root / "valid/good/img" / f"{n}.png")
    for n in range(3):
        image(root / "test/Ungood/img" / f"{n + 10}.png", 70)
        mask(root / "test/Ungood/label" / f"{n + 10}.png")
    return root


@pytest.mark.parametrize("name, kind, cls", [("Liver", "liverct", "liver"), ("Retina_RESC", "resc", "retina")])
def test_bmad_layouts(tmp_path: Path, name: str, kind: str, cls: str) -> None:
    root = make_bmad(tmp_path / name)
    assert detect_kind(root) == kind
    samples = load_dataset(kind, root)
    assert counts(samples) == {cls: {"n_normal": 2, "n_anomalous": 3, "n_masks": 3}}
    assert all("valid" not in s.image.parts for s in samples)


def test_bmad_ambiguous_name_and_missing_test(tmp_path: Path) -> None:
    root = make_bmad(tmp_path / "data")
    with pytest.raises(DatasetError) as error:
        detect_kind(root)
    one_line_error(error, "liverct=", "resc=")
    assert len(load_dataset("liverct", root)) == 5
    only_valid = tmp_path / "Liver2"
    image(only_valid / "valid/good/img/0.png")
    load_error("liverct", only_valid, "test/good/img", "valid/ is not used", "'valid/'")


@pytest.mark.parametrize("images_folder", [True, False])
def test_covid19_layout(tmp_path: Path, images_folder: bool) -> None:
    root = tmp_path / "COVID-19_Radiography_Dataset"
    sub = "images" if images_folder else ""
    for n in range(2):
        image(root / "COVID" / sub / f"COVID-{n + 1}.png")
        mask(root / "COVID" / "masks" / f"COVID-{n + 1}.png")  # lung masks: not anomaly masks
    for n in range(3):
        image(root / "Normal" / sub / f"Normal-{n + 1}.png")
    image(root / "Viral Pneumonia" / "images" / "Viral Pneumonia-1.png")
    assert detect_kind(root) == "covid19"
    samples = load_dataset("covid19", root)
    assert counts(samples) == {"chest": {"n_normal": 3, "n_anomalous": 2, "n_masks": 0}}


def make_headct(root: Path, n: int = 4) -> Path:
    for i in range(n):
        image(root / "head_ct" / f"{i:03d}.png", mode="RGB")
    rows = "".join(f"{i},{int(i < n // 2)}\n" for i in range(n))
    (root / "labels.csv").write_text("id, hemorrhage\n" + rows)
    return root


def test_headct_layout_and_errors(tmp_path: Path) -> None:
    root = make_headct(tmp_path / "headct")
    assert detect_kind(root) == "headct"
    samples = load_dataset("headct", root)
    assert counts(samples) == {"head": {"n_normal": 2, "n_anomalous": 2, "n_masks": 0}}
    assert [s.label for s in samples] == [1, 1, 0, 0]
    image(root / "head_ct" / "004.png")
    load_error("headct", root, "004.png", "no row")
    (root / "head_ct" / "004.png").unlink()
    (root / "head_ct" / "001.png").unlink()
    load_error("headct", root, "id 1", "001.png")
    image(root / "head_ct" / "001.png")
    with (root / "labels.csv").open("a") as handle:
        handle.write("0,1\n")
    load_error("headct", root, "id 0", "twice")


def test_mtd_layout_thresholds_grey_fringes(tmp_path: Path) -> None:
    root = tmp_path / "Magnetic-tile-defect-datasets."
    image(root / "MT_Free/Imgs/exp1_num_1.jpg")
    mask(root / "MT_Free/Imgs/exp1_num_1.png", on=0)
    image(root / "MT_Crack/Imgs/exp1_num_2.jpg")
    fringe = np.zeros((8, 8), np.uint8)
    fringe[2:5, 2:5] = 255
    fringe[5, 2:5] = 100  # a grey fringe below the cut
    Image.fromarray(fringe).save(root / "MT_Crack/Imgs/exp1_num_2.png")
    assert detect_kind(root) == "mtd"
    samples = load_dataset("mtd", root)
    assert counts(samples) == {"magnetic_tile": {"n_normal": 1, "n_anomalous": 1, "n_masks": 1}}
    crack = next(s for s in samples if s.label)
    assert crack.defect == "Crack" and crack.mask.suffix == ".png"
    assert load_mask(crack, (8, 8)).sum() == 9
    (root / "MT_Crack/Imgs/exp1_num_2.png").unlink()
    load_error("mtd", root, "exp1_num_2.jpg", "no mask")


def test_folder_layout(tmp_path: Path) -> None:
    root = tmp_path / "My Parts"
    image(root / "normal" / "a.png")
    image(root / "normal" / "b.PNG")
    (root / "normal" / "notes.txt").write_text("not an image")
    image(root / "normal" / ".hidden.png")
    image(root / "anomalous" / "c.jpg")
    image(root / "anomalous" / "d.tif")
    mask(root / "masks" / "c_mask.png")
    mask(root / "masks" / "d.png")
    assert detect_kind(root) == "folder"
    samples = load_dataset("folder", root)
    assert counts(samples) == {"my_parts": {"n_normal": 2, "n_anomalous": 2, "n_masks": 2}}
    (root / "masks" / "d.png").unlink()
    load_error("folder", root, "d.tif", "no mask")
    (root / "masks" / "c_mask.png").unlink()
    (root / "masks").rmdir()
    alt = load_dataset("folder", root)  # without masks/, anomalous images need none
    assert [s.mask for s in alt] == [None] * 4


def test_folder_alternative_names(tmp_path: Path) -> None:
    root = tmp_path / "widgets"
    image(root / "Good" / "a.png")
    image(root / "bad" / "b.png")
    image(root / "defect" / "c.png")
    assert detect_kind(root) == "folder"
    assert counts(load_dataset("folder", root)) == {"widgets": {"n_normal": 1, "n_anomalous": 2, "n_masks": 0}}


# ------------------------------------------------------- detection and arguments


def test_wrong_layout_errors_say_expected_and_found(tmp_path: Path) -> None:
    (tmp_path / "foo").mkdir()
    (tmp_path / "bar").mkdir()
    for kind in KINDS:
        load_error(kind, tmp_path, f"{kind} dataset at {tmp_path}", "expected", "'bar/', 'foo/'")
    with pytest.raises(DatasetError) as error:
        detect_kind(tmp_path)
    one_line_error(error, "no known layout", "'bar/', 'foo/'", "mvtec")
    load_error("mvtec", tmp_path / "missing", "does not exist")
    empty = tmp_path / "foo"
    load_error("btad", empty, "an empty folder")


def test_detect_refuses_a_folder_of_several_datasets(tmp_path: Path) -> None:
    make_mvtec(tmp_path / "mvtec", ("bottle",))
    make_headct(tmp_path / "headct")
    with pytest.raises(DatasetError) as error:
        detect_kind(tmp_path)
    one_line_error(error, "several datasets", "mvtec/ (mvtec)", "headct/ (headct)")


def test_parse_data_arg(tmp_path: Path) -> None:
    root = make_headct(tmp_path / "ct")
    assert parse_data_arg(f"headct={root}") == ("headct", root)
    assert parse_data_arg(str(root)) == ("headct", root)
    assert parse_data_arg(f"HeadCT = {root}")[0] == "headct"
    assert parse_data_arg(f"MVTec-AD={root}")[0] == "mvtec"  # alias; layout checked when loading
    with pytest.raises(InputError) as error:
        parse_data_arg(f"bogus={root}")
    one_line_error(error, "'bogus'", ", ".join(KINDS))
    with pytest.raises(DatasetError):
        parse_data_arg(f"mvtec={tmp_path / 'nope'}")
    with pytest.raises(InputError, match="no path"):
        parse_data_arg("mvtec=")
    odd = make_headct(tmp_path / "a=b")
    assert parse_data_arg(str(odd)) == ("headct", odd)  # a path with '=' in it
    with pytest.raises(InputError):
        load_dataset("nope", root)


def test_load_mask_sizes_and_modes(tmp_path: Path) -> None:
    path = mask(tmp_path / "m.png", box=(0, 0, 4, 4), size=8)
    sample = Sample(tmp_path / "i.png", "x", 1, path, "folder")
    full = load_mask(sample)
    assert full.dtype == bool and full.shape == (8, 8) and full.sum() == 16
    small = load_mask(sample, (4, 2))
    assert small.shape == (4, 2) and small.dtype == bool
    assert small.tolist() == [[True, False], [True, False], [False, False], [False, False]]  # top-left quarter
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 255  # opaque alpha must not count as defect
    rgba[1, 1, :3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert load_mask(Sample(tmp_path / "i.png", "x", 1, tmp_path / "rgba.png", "folder")).sum() == 1
    normal = Sample(tmp_path / "i.png", "x", 0, None, "folder")
    assert load_mask(normal, (3, 5)).shape == (3, 5) and not load_mask(normal, (3, 5)).any()
    with pytest.raises(InputError):
        load_mask(normal)
    with pytest.raises(InputError):
        load_mask(normal, (0, 5))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError) as error:
        load_mask(Sample(tmp_path / "i.png", "x", 1, tmp_path / "bad.png", "folder"), (8, 8))
    one_line_error(error, "bad.png")


def test_verify_images_reports_unreadable_files_by_path(tmp_path: Path) -> None:
    root = tmp_path / "parts"
    image(root / "normal" / "ok.png")
    (root / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    image(root / "anomalous" / "a.png")
    samples = load_dataset("folder", root)  # listing does not open images
    assert len(samples) == 3
    failures = verify_images(samples)
    assert [path.name for path, _ in failures] == ["broken.png"]
    assert failures[0][1] and "\n" not in failures[0][1]
    (root / "anomalous" / "a.png").unlink()
    assert {p.name for p, _ in verify_images(samples)} == {"broken.png", "a.png"}


# ------------------------------------------------------------------ real data


def test_real_mvtec_bottle(shared_data: Path) -> None:
    root = shared_data / "mvtec_ad" / "bottle"
    assert detect_kind(root) == "mvtec" and detect_kind(shared_data / "mvtec_ad") == "mvtec"
    samples = load_dataset(None, root)
    assert summarize(samples) == {"bottle": {"n_normal": 20, "n_anomalous": 63, "n_masks": 63}}
    defects = {d: sum(s.defect == d for s in samples) for d in {s.defect for s in samples}}
    assert defects == {"good": 20, "broken_large": 20, "broken_small": 22, "contamination": 21}
    assert load_dataset("mvtec", shared_data / "mvtec_ad") == samples
    first = next(s for s in samples if s.label)
    assert load_mask(first, (336, 336)).any()


def test_real_mtd(shared_data: Path) -> None:
    samples = load_dataset(None, shared_data / "mtd")
    assert summarize(samples) == {"magnetic_tile": {"n_normal": 952, "n_anomalous": 392, "n_masks": 392}}
    defects = {d: sum(s.defect == d for s in samples) for d in {s.defect for s in samples}}
    assert defects == {"good": 952, "Blowhole": 115, "Break": 85, "Crack": 57, "Fray": 32, "Uneven": 103}
    uneven = [s for s in samples if s.defect == "Uneven"]
    empty = [s.image.name for s in uneven if not load_mask(s).any()]
    assert len(empty) == 4  # the README: 4 Uneven masks are empty


def test_real_headct(shared_data: Path) -> None:
    assert detect_kind(shared_data / "headct") == "headct"
    samples = load_dataset("headct", shared_data / "headct")
    assert summarize(samples) == {"head": {"n_normal": 100, "n_anomalous": 100, "n_masks": 0}}
    assert verify_images(samples) == []


def test_train_normals_of_an_mvtec_tree_and_none_elsewhere(tmp_path, shared_data):
    """MVTec-style trees publish train/good (the k-shot references' pool); HeadCT publishes no train split."""
    from PIL import Image

    from kanoclip.data import load_train_normals

    root = tmp_path / "mvtec"
    for folder, n in (("train/good", 3), ("test/good", 1), ("test/crack", 1)):
        (root / "bottle" / folder).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(root / "bottle" / folder / f"{i:03d}.png")
    (root / "bottle" / "ground_truth" / "crack").mkdir(parents=True)
    Image.new("L", (8, 8)).save(root / "bottle" / "ground_truth" / "crack" / "000_mask.png")
    pool = load_train_normals("mvtec", root)
    assert list(pool) == ["bottle"] and [p.name for p in pool["bottle"]] == ["000.png", "001.png", "002.png"]
    assert all(p.parent.name == "good" and p.parent.parent.name == "train" for p in pool["bottle"])
    assert load_train_normals("headct", shared_data / "headct") == {}
    assert load_train_normals("mvtec", shared_data / "mvtec_ad") == {}  # the shared bottle copy is its test split only
