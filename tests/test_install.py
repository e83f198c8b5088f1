"""densessl installs as one import name beside a user's own project, and its declared dependency ranges admit the
exact set that ``make setup`` installs (constraints.txt)."""

import re
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "model", "train", "evaluation", "slurm", "benchmarks", "experiments")

# A research project's own files, named as ours were before they moved under densessl.
USER_MODULES = {name: f'WHOSE = "the user\'s {name}"\n' for name in ("model", "train", "pipeline", "evaluation")}

USER_SCRIPT = textwrap.dedent("""
    import importlib
    import sys
    # the user's own modules, first on the path
    model, pipeline, train, evaluation = map(importlib.import_module, ("model", "pipeline", "train", "evaluation"))

    import torch
    from densessl.evaluation.features import feature_extractor
    from densessl.model.builder import MoCo, ModelConfig
    from densessl.model.methods import method_config
    from densessl.pipeline import PairSpec, PhotometricAugment, build_loader, matched_views

    spec = PairSpec(size=(64, 64), num_matches=8, min_matches=8).view_spec
    batch = next(iter(build_loader("torch", sys.argv[1], spec, batch_size=4, workers=0, seed=0)))
    augment = PhotometricAugment()
    moco = MoCo(ModelConfig(arch="resnet18"), method_config("vader", queue_size=256))
    views, pairs = matched_views(batch, spec)
    loss, stats = moco({name: augment(v) for name, v in views.items()}, pairs, 0)
    assert torch.isfinite(loss), loss
    (extract,) = feature_extractor("random:resnet18", kinds=("hypercolumn",)).values()
    feats = extract(augment(views["pair0"]))
    for mine in (model, pipeline, train, evaluation):
        assert sys.modules[mine.__name__] is mine and mine.WHOSE == f"the user's {mine.__name__}", mine
    print(f"loss {float(loss):.4f} features {tuple(feats.shape)}")
""")


def test_an_outside_project_keeps_its_own_modules(tmp_path, synthetic_root):
    """A project with its own model.py, train.py, pipeline.py and evaluation.py builds our loader, computes a
    method's loss and extracts features through densessl, and its own modules stay its own."""
    for name, text in USER_MODULES.items():
        (tmp_path / f"{name}.py").write_text(text)
    (tmp_path / "use_densessl.py").write_text(USER_SCRIPT)
    done = subprocess.run([sys.executable, "use_densessl.py", str(synthetic_root / "train")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"loss \d+\.\d+ features \(4, \d+, 16, 16\)", done.stdout), done.stdout


def test_the_wheel_installs_densessl_and_nothing_else(tmp_path):
    """``pip wheel --no-deps .``: one top-level name; installed into an empty target, it imports from another
    working directory with no editable install on the path."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(REPO), "-w", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("densessl-*.whl")
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"densessl"}, top
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    probe = textwrap.dedent(f"""
        import sys
        sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
        sys.path = [{str(target)!r}] + [p for p in sys.path if "__editable__" not in p]
        import densessl.pipeline, densessl.train.trainer
        print(densessl.pipeline.__file__)
    """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(target / "densessl" / "pipeline" / "__init__.py")


def test_no_module_imports_a_bare_generic_name():
    """Ours import densessl.<package> or relatively."""
    pattern = re.compile(rf"^\s*(from|import) ({'|'.join(PACKAGES)})\b", re.M)
    offenders = [f"{p.relative_to(REPO)}:{src[:m.start()].count(chr(10)) + 1}"
                 for folder in (*PACKAGES, "tests", "examples") for p in sorted((REPO / folder).rglob("*.py"))
                 for src in [p.read_text()] for m in pattern.finditer(src)]
    assert not offenders, offenders


def test_the_constraints_satisfy_the_declared_ranges():
    """Every pinned version in constraints.txt lies in pyproject.toml's range for it (extras included), and
    every declared dependency is pinned, so make setup installs exactly what we test."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.split("+")[0]
    for req in declared:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is declared but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req}"
    assert Requirement(f"python{project['requires-python']}").specifier.contains("3.11")
