"""Write the ELPV solar-cell images as a category in the MVTec AD layout: a real textured category
with image labels only, for measuring the defaults on textures.

    pip download --no-deps elpv-dataset && unzip -q elpv_dataset-*.whl -d elpv
    python tools/elpv_layout.py --elpv elpv/elpv_dataset/data --data-root data/mvtec_ad
    python train.py --model dae --category solar_cells
    python detect.py --class solar_cells

ELPV (Buerhop-Lutz et al. 2018; Deitsch et al. 2019; CC BY-NC-SA 4.0) holds 2624 electroluminescence
images of monocrystalline and polycrystalline cells, 300 x 300 px grey, each with the probability
that it is defective (0, 1/3, 2/3 or 1) in labels.csv (`images/cell0001.png  1.0  mono`).
Cells rated 0 are good, cells rated 1 defective; the uncertain ratings are left out. Every fourth
good cell (labels.csv order) goes to test/good, the rest to train/good; the defective cells go to
test/defective_mono and test/defective_poly. There are no masks, so detect.py reports image
metrics only.
"""
import argparse
import shutil
import sys
from pathlib import Path

TEST_EVERY = 4  # every fourth good cell is a good test image


def read_labels(path):
    """[(relative image path, defect probability, cell type)] from ELPV's labels.csv; a line that
    is not `image probability type` stops with one error line naming it."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            image, probability, kind = line.split()
            rows.append((image, float(probability), kind))
        except ValueError:
            sys.exit(f"error: {path} line {number} is not 'image probability type': {line.strip()!r}")
    return rows


def layout(rows):
    """[(relative image path, destination inside the category)] for the MVTec layout."""
    good = sorted(r for r in rows if r[1] == 0.0)
    places = [(image, f"{'test' if i % TEST_EVERY == 0 else 'train'}/good/{kind}_{Path(image).name}")
              for i, (image, _, kind) in enumerate(good)]
    places += [(image, f"test/defective_{kind}/{Path(image).name}") for image, p, kind in rows if p == 1.0]
    return places


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--elpv", required=True, help="ELPV's data folder: labels.csv and images/")
    p.add_argument("--data-root", default="data/mvtec_ad", help="where categories live (default: data/mvtec_ad)")
    p.add_argument("--category", default="solar_cells", help="name of the new category (default: solar_cells)")
    args = p.parse_args(argv)
    source, target = Path(args.elpv), Path(args.data_root) / args.category
    if not (source / "labels.csv").is_file():
        sys.exit(f"error: {source / 'labels.csv'} not found: --elpv must be ELPV's data folder")
    if target.exists():
        sys.exit(f"error: {target} exists already; remove it or choose another --category")
    places = layout(read_labels(source / "labels.csv"))
    missing = [image for image, _ in places if not (source / image).is_file()]
    if missing:
        sys.exit(f"error: {len(missing)} images named in labels.csv are missing, e.g. {source / missing[0]}")
    for image, place in places:
        (target / place).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / image, target / place)
    counts = {}
    for _, place in places:
        folder = str(Path(place).parent)
        counts[folder] = counts.get(folder, 0) + 1
    print(f"{target}: " + ", ".join(f"{folder} {n}" for folder, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
