"""A fresh clone carries what the demo and the tests read: WikiText-2 with its licence, nothing from outside."""
from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import subprocess

import pytest

from eqcompiler.data import BUNDLED_WIKITEXT, find_wikitext
from eqcompiler.errors import EqcError

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path("eqcompiler/datasets/wikitext-2")


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout (or no git): a fresh clone cannot be made from this copy")
    target = tmp_path_factory.mktemp("fresh") / "eqc"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(target)], check=True,
                   capture_output=True)
    return target


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_clone_carries_wikitext_with_licence_and_hashes(clone: pathlib.Path) -> None:
    folder = clone / DATA
    readme = (folder / "README.md").read_text()
    assert "CC BY-SA 3.0" in readme and "Merity" in readme
    assert "Attribution-ShareAlike 3.0" in (folder / "LICENSE").read_text()
    for split in ("valid", "test"):
        text = folder / f"{split}.txt"
        (listed,) = re.findall(rf"sha256 {split}\.txt:\s+([0-9a-f]{{64}})", readme)
        assert _sha256(text) == listed
        assert len(text.read_text(encoding="utf-8").split()) > 200_000  # the whole split, not a sample


def test_nothing_in_the_clone_reads_outside_it(clone: pathlib.Path) -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=clone, check=True, capture_output=True, text=True).stdout.split()
    this = pathlib.Path(__file__).relative_to(REPO).as_posix()  # names the patterns below
    code = [f for f in tracked if (f.endswith((".py", ".sh", ".toml", ".cfg")) or pathlib.Path(f).name in ("Makefile", "run"))
            and f != this]
    offenders = [f for f in code if re.search(r'\.\./shared|/work/shared|shared[/]data|/ "shared"', (clone / f).read_text(errors="replace"))]
    assert code and offenders == []


def test_installed_package_resolves_the_shipped_data(clone: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EQC_WIKITEXT", raising=False)
    for split in ("valid", "test"):
        path = find_wikitext(split)
        assert path.parent == BUNDLED_WIKITEXT
        assert path.read_bytes() == (clone / DATA / f"{split}.txt").read_bytes()
    if os.environ.get("EQC_REQUIRE_INSTALLED") == "1":  # `make test`: the wheel's copy, not the checkout's
        assert "site-packages" in BUNDLED_WIKITEXT.parts
        assert (BUNDLED_WIKITEXT / "LICENSE").is_file() and (BUNDLED_WIKITEXT / "README.md").is_file()


def test_a_wrong_text_folder_is_one_clear_error(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EQC_WIKITEXT", str(tmp_path))
    with pytest.raises(EqcError, match=r"WikiText-2 'test.txt' not found in .* \(from EQC_WIKITEXT\)"):
        find_wikitext("test")
    (tmp_path / "test.txt").write_text("a b c\n")
    assert find_wikitext("test") == tmp_path / "test.txt"
