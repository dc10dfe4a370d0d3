"""CI cannot go green by skipping: under CI=true a skip is a failure (tests/strict_ci.py), `make
sysdeps` fails when Chromium or Fashion-MNIST is missing and cannot be installed
(.ci/sysdeps.sh; locally it warns), and `.ci/run` fails when the tests fail. No real apt-get,
browser or venv is involved: stubs on PATH stand in for them."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
SKIPPING = """
import pytest

def test_ok():
    pass

@pytest.mark.skipif(True, reason="Chromium not installed")
def test_browser():
    pass

def test_dataset():
    pytest.skip("dataset-fashion-mnist is not installed")

def test_module():
    pytest.importorskip("no_such_module_xyz")

@pytest.mark.xfail(reason="known bug", strict=True)
def test_known():
    assert False
"""


@pytest.mark.parametrize("ci", ["true", "1", "TRUE"])
def test_under_ci_every_skip_fails_and_says_why(pytester, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(test_skipping=SKIPPING)
    res = pytester.runpytest("-p", "strict_ci", "-ra", "-p", "no:cacheprovider")
    res.assert_outcomes(passed=1, errors=1, failed=2, xfailed=1)  # skipif fails at set-up: an error
    out = res.stdout.str()
    assert "CI=true, so a skip is a failure: Chromium not installed" in out
    assert "CI=true, so a skip is a failure: dataset-fashion-mnist is not installed" in out
    assert "CI=true, so a skip is a failure: could not import 'no_such_module_xyz'" in out
    assert res.ret == 1


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_outside_ci_a_skip_stays_a_skip(pytester, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    pytester.makepyfile(test_skipping=SKIPPING)
    res = pytester.runpytest("-p", "strict_ci", "-p", "no:cacheprovider")
    res.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert res.ret == 0


def test_under_ci_a_module_level_skip_fails(pytester, monkeypatch):
    monkeypatch.setenv("CI", "true")
    pytester.makepyfile(test_mod="import pytest\npytest.importorskip('no_such_module_xyz')\n\ndef test_x():\n    pass\n")
    res = pytester.runpytest("-p", "strict_ci", "-p", "no:cacheprovider")
    assert res.ret != 0
    assert "CI=true, so a skip is a failure: could not import 'no_such_module_xyz'" in res.stdout.str()


# -- make sysdeps (.ci/sysdeps.sh) ------------------------------------------------------------------

def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.fixture
def sysdeps(tmp_path):
    """Run .ci/sysdeps.sh as root with a stub apt-get (the exit code of `install`: APT_RC; with APT_CREATES
    it "installs" by creating that folder). Returns run(env) -> (CompletedProcess, apt calls)."""
    bindir = tmp_path / "bin"  # the only PATH: the tools the script uses, and no real chromium
    bindir.mkdir()
    for tool in ("sh", "tr", "sed", "mktemp", "tail", "rm", "mkdir"):
        (bindir / tool).symlink_to(shutil.which(tool))
    calls = tmp_path / "apt-calls"
    _stub(bindir / "apt-get", f'echo "$*" >> {calls}\n'
                              '[ -n "${APT_CREATES:-}" ] && mkdir -p "$APT_CREATES"\n'
                              '[ "$1" = install ] || exit 0\n'
                              'echo "E: Unable to locate package" >&2\nexit "${APT_RC:-0}"\n')
    _stub(bindir / "id", 'echo 0\n')
    _stub(bindir / "dpkg", 'exit 1\n')  # no Debian package counts as installed
    chromium = tmp_path / "chromium"
    _stub(chromium, "exit 0\n")
    fashion = tmp_path / "fashion-mnist"
    fashion.mkdir()

    def run(**env):
        full = {"PATH": str(bindir), "STEALNB_CHROMIUM": str(chromium), "FASHION_DIR": str(fashion),
                "WALLPAPER_PKGS": "", **env}
        full = {k: v for k, v in full.items() if v is not None}  # None: unset
        proc = subprocess.run([str(bindir / "sh"), str(ROOT / ".ci" / "sysdeps.sh")], env=full, capture_output=True,
                              text=True)
        apt = calls.read_text().splitlines() if calls.exists() else []
        calls.unlink(missing_ok=True)
        return proc, apt

    run.tmp = tmp_path
    return run


def test_sysdeps_is_silent_when_everything_is_there(sysdeps):
    for ci in ("true", None):
        proc, apt = sysdeps(CI=ci)
        assert (proc.returncode, proc.stderr, apt) == (0, "", [])


def test_sysdeps_fails_under_ci_when_apt_fails_and_warns_locally(sysdeps):
    gone = str(sysdeps.tmp / "no-fashion")
    proc, apt = sysdeps(CI="true", FASHION_DIR=gone, APT_RC="100")
    assert proc.returncode == 1
    assert apt == ["update -qq", "install -y -qq dataset-fashion-mnist"]
    assert "sysdeps: ERROR: missing dataset-fashion-mnist -- apt-get install dataset-fashion-mnist failed (exit 100)" \
        in proc.stderr
    assert "CI=true needs them" in proc.stderr
    proc, apt = sysdeps(FASHION_DIR=gone, APT_RC="100")  # locally: a warning, and on
    assert proc.returncode == 0 and "sysdeps: warning: missing dataset-fashion-mnist" in proc.stderr
    assert "will be skipped" in proc.stderr


def test_sysdeps_fails_under_ci_without_the_wallpaper_photos(sysdeps):
    proc, apt = sysdeps(CI="true", WALLPAPER_PKGS="mate-backgrounds")  # dpkg says: not installed
    assert proc.returncode == 1 and "apt-get install mate-backgrounds" in proc.stderr
    assert "install -y -qq mate-backgrounds" in " ".join(apt)


def test_sysdeps_installs_what_is_missing(sysdeps):
    new = str(sysdeps.tmp / "installed-fashion")
    proc, apt = sysdeps(CI="true", FASHION_DIR=new, APT_CREATES=new)
    assert (proc.returncode, proc.stderr) == (0, "") and apt[-1] == "install -y -qq dataset-fashion-mnist"


def test_sysdeps_fails_under_ci_without_chromium(sysdeps):
    missing = str(sysdeps.tmp / "nowhere" / "chromium")
    proc, apt = sysdeps(CI="true", STEALNB_CHROMIUM=missing)
    assert proc.returncode == 1 and apt == []  # apt-get cannot provide a custom path
    assert f"sysdeps: ERROR: missing chromium (STEALNB_CHROMIUM={missing} is not an executable)" in proc.stderr
    # Without STEALNB_CHROMIUM, chromium is looked up on PATH (here: only the stubs) and installed.
    proc, apt = sysdeps(CI="true", STEALNB_CHROMIUM="", APT_RC="1")
    assert proc.returncode == 1 and apt[-1] == "install -y -qq chromium"
    assert "sysdeps: ERROR: missing chromium -- apt-get install chromium failed (exit 1)" in proc.stderr


def test_sysdeps_not_root_fails_under_ci(sysdeps):
    _stub(sysdeps.tmp / "bin" / "id", "echo 1000\n")
    proc, apt = sysdeps(CI="true", FASHION_DIR=str(sysdeps.tmp / "none"))
    assert proc.returncode == 1 and apt == []
    assert "not root or no apt-get, so nothing was installed; run: sudo apt-get install dataset-fashion-mnist" \
        in proc.stderr


def test_make_test_checks_sysdeps_before_installing_anything():
    out = subprocess.run(["make", "-n", "-C", str(ROOT), "test", "VENV=/nonexistent-venv"], capture_output=True,
                         text=True, check=True).stdout
    assert out.index("sysdeps.sh") < out.index("-m venv") < out.index("-m pytest")


# -- .ci/run ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe, rc", [("@exit 3", 2), ("@true", 0)])
def test_ci_run_fails_when_make_test_fails(tmp_path, recipe, rc):
    (tmp_path / ".ci").mkdir()
    shutil.copy2(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / ".venv").mkdir()  # a stale venv: removed first
    (tmp_path / "Makefile").write_text(f'test:\n\t@test "$$CI" = true || (echo "CI=$$CI" && exit 9)\n\t{recipe}\n')
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    proc = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], env=env, capture_output=True, text=True)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    assert not (tmp_path / ".venv").exists()
