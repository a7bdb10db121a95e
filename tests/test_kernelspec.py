"""Tests for supervisor.kernelspec: search order, validation, native python3, templating."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor._log import capture_logs
from supervisor.errors import KernelSpecError, NoSuchKernel
from supervisor.kernelspec import (
    NAME_PATTERN,
    KernelSpec,
    expand_env,
    find_kernel_specs,
    format_kernel_cmd,
    get_all_specs,
    get_kernel_spec,
    jupyter_path,
    kernel_dirs,
    native_python_spec,
)


class Env:
    """A crafted, isolated jupyter environment under tmp_path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.p1 = root / "p1"
        self.p2 = root / "p2"
        self.home = root / "home"
        self.data = root / "data"
        self.vars = {
            "JUPYTER_PATH": os.pathsep.join([str(self.p1), str(self.p2)]),
            "JUPYTER_DATA_DIR": str(self.data),
            "HOME": str(self.home),
            "PYTHONUSERBASE": str(root / "userbase"),
            "IPYTHONDIR": str(root / "ipython"),
        }
        self.home.mkdir()

    def spec(self, where: Path, name: str, data: Any = None, *, raw: str | None = None) -> Path:
        """Write <where>/kernels/<name>/kernel.json and return the resource dir."""
        rdir = where / "kernels" / name
        rdir.mkdir(parents=True)
        if data is None:
            data = {"argv": ["python", "-m", name], "display_name": name, "language": "x"}
        text = raw if raw is not None else json.dumps(data)
        (rdir / "kernel.json").write_text(text, encoding="utf-8")
        return rdir


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    """Point every jupyter search variable at tmp_path."""
    e = Env(tmp_path)
    for var in ("XDG_DATA_HOME", "JUPYTER_PREFER_ENV_PATH", "JUPYTER_PLATFORM_DIRS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in e.vars.items():
        monkeypatch.setenv(var, value)
    return e


def _subprocess_env(e: Env) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items() if k not in ("XDG_DATA_HOME",)}
    full.update(e.vars)
    return full


# -- search path ---------------------------------------------------------------------


@pytest.mark.parametrize("prefer", [None, "0", "1", "no", "true"])
def test_jupyter_path_matches_jupyter_core(env: Env, monkeypatch: pytest.MonkeyPatch,
                                           prefer: str | None) -> None:
    """jupyter_path() lists the same dirs, in the same order, as jupyter_core in a fresh process."""
    sub = _subprocess_env(env)
    if prefer is not None:
        monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", prefer)
        sub["JUPYTER_PREFER_ENV_PATH"] = prefer
    code = (
        "import json; from jupyter_core.paths import jupyter_path as j;"
        " print(json.dumps(j('kernels')))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=sub, capture_output=True,
                         text=True, check=True, timeout=60)
    assert [str(p) for p in jupyter_path("kernels")] == json.loads(out.stdout)
    assert kernel_dirs() == jupyter_path("kernels")
    assert kernel_dirs()[:2] == [env.p1 / "kernels", env.p2 / "kernels"]


def test_jupyter_path_venv_first(env: Env, tmp_path: Path) -> None:
    """Inside a virtualenv the env dir precedes the user dir, exactly as jupyter_core orders it."""
    import site

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    # The new venv sees the packages of the interpreter running this test (itself often a
    # venv, whose packages a nested --system-site-packages venv would not see) through a
    # .pth file; it is still a venv of its own, which is what the ordering depends on.
    inner = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    paths = [*site.getsitepackages(), str(Path(__file__).resolve().parents[1])]
    (inner / "site-packages" / "outer.pth").write_text("\n".join(paths) + "\n")
    code = (
        "import json, sys; from jupyter_core.paths import jupyter_path as j;"
        " from supervisor.kernelspec import jupyter_path as k;"
        " assert sys.prefix != sys.base_prefix, 'not in a venv';"
        " print(json.dumps([sys.prefix, j('kernels'), [str(p) for p in k('kernels')]]))"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], env=_subprocess_env(env),
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    prefix, theirs, ours = json.loads(out.stdout)
    assert Path(prefix) == venv
    assert ours == theirs
    venv_share = str(venv / "share" / "jupyter" / "kernels")
    assert ours.index(venv_share) < ours.index(str(env.data / "kernels"))


# -- lookup --------------------------------------------------------------------------


def test_first_hit_wins_case_insensitively(env: Env) -> None:
    """The earliest directory wins, names compare case-insensitively and are reported lowercase."""
    first = env.spec(env.p1, "MyKernel", {"argv": ["a"], "display_name": "first"})
    env.spec(env.p2, "mykernel", {"argv": ["b"], "display_name": "second"})
    env.spec(env.data, "mykernel", {"argv": ["c"], "display_name": "third"})
    found = find_kernel_specs()
    assert found["mykernel"] == first
    spec = get_kernel_spec("MYKERNEL")
    assert (spec.name, spec.display_name, spec.argv) == ("mykernel", "first", ("a",))
    assert spec.resource_dir == first


def test_invalid_names_skipped_with_warning(env: Env) -> None:
    """Directories whose names are not valid kernel names are skipped and logged."""
    env.spec(env.p1, "bad name")
    env.spec(env.p1, "ok.name_1-x")
    (env.p1 / "kernels" / "no-json").mkdir()
    with capture_logs() as logs:
        found = find_kernel_specs()
    assert "ok.name_1-x" in found
    assert "bad name" not in found and "no-json" not in found
    warned = [e for e in logs if e["log_level"] == "warning"]
    assert [e["path"] for e in warned] == [str(env.p1 / "kernels" / "bad name")]
    with pytest.raises(NoSuchKernel):
        get_kernel_spec("bad name")
    assert NAME_PATTERN.fullmatch("ok.name_1-x") and not NAME_PATTERN.fullmatch("é")


def test_no_such_kernel(env: Env) -> None:
    """An unknown name raises NoSuchKernel, which is also a KeyError."""
    with pytest.raises(NoSuchKernel) as info:
        get_kernel_spec("does-not-exist")
    assert isinstance(info.value, KeyError)
    assert "does-not-exist" in str(info.value)


BROKEN = [
    ("{not json", None),
    ("[1, 2]", None),
    ('{"display_name": "x"}', "argv"),
    ('{"argv": "python -m x"}', "argv"),
    ('{"argv": ["python", 3]}', "argv"),
    ('{"argv": []}', "argv"),
    ('{"argv": ["a"], "interrupt_mode": "sometimes"}', "interrupt_mode"),
    ('{"argv": ["a"], "env": {"A": 1}}', "env"),
    ('{"argv": ["a"], "metadata": [1]}', "metadata"),
    ('{"argv": ["a"], "display_name": 5}', "display_name"),
    ('{"argv": ["a"], "language": null}', "language"),
]


@pytest.mark.parametrize(("raw", "field"), BROKEN)
def test_broken_spec_names_file_and_field(env: Env, raw: str, field: str | None) -> None:
    """A broken kernel.json raises KernelSpecError carrying the file path and the field."""
    rdir = env.spec(env.p1, "broken", raw=raw)
    with pytest.raises(KernelSpecError) as info:
        get_kernel_spec("broken")
    assert not isinstance(info.value, NoSuchKernel)
    assert info.value.path == str(rdir / "kernel.json")
    assert info.value.field == field
    assert str(rdir / "kernel.json") in str(info.value)
    if field:
        assert field in str(info.value)


def test_get_all_specs_skips_broken_with_warning(env: Env) -> None:
    """Listing leaves broken specs out and logs a warning naming the file and the reason."""
    good = env.spec(env.p1, "good")
    bad = env.spec(env.p2, "bad", raw='{"argv": 7}')
    worse = env.spec(env.p2, "worse", raw="{")
    with capture_logs() as logs:
        specs = get_all_specs()
    assert specs["good"] == {
        "resource_dir": str(good),
        "spec": {
            "argv": ["python", "-m", "good"], "env": {}, "display_name": "good",
            "language": "x", "interrupt_mode": "signal", "metadata": {},
            "kernel_protocol_version": "",
        },
    }
    assert "bad" not in specs and "worse" not in specs
    warned = {e["path"]: e for e in logs if e["log_level"] == "warning"}
    assert set(warned) == {str(bad / "kernel.json"), str(worse / "kernel.json")}
    assert warned[str(bad / "kernel.json")]["field"] == "argv"
    assert "JSON" in warned[str(worse / "kernel.json")]["reason"]


# -- native python3 ------------------------------------------------------------------


def test_native_python_spec_matches_ipykernel() -> None:
    """The native spec mirrors ipykernel's own kernel dict, with this interpreter."""
    import ipykernel.kernelspec as ik

    spec = native_python_spec()
    assert spec is not None
    expected = ik.get_kernel_dict()
    assert spec.name == "python3"
    assert list(spec.argv) == expected["argv"]
    assert spec.argv[0] == sys.executable
    assert spec.display_name == expected["display_name"] == "Python 3 (ipykernel)"
    assert spec.language == "python"
    assert dict(spec.metadata) == expected["metadata"]
    assert spec.metadata["debugger"] is True
    assert spec.resource_dir == Path(ik.RESOURCES)


def test_native_fallback_and_python_alias(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no python3 spec on disk the native one is used; "python" resolves to it."""
    fake_prefix = str(env.root / "prefix")  # hide sys.prefix/share/jupyter/kernels/python3
    monkeypatch.setattr(sys, "prefix", fake_prefix)
    monkeypatch.setattr(sys, "base_prefix", fake_prefix)
    native = native_python_spec()
    assert native is not None
    assert find_kernel_specs()["python3"] == native.resource_dir
    assert get_kernel_spec("python") == native
    assert get_kernel_spec("Python3") == native
    listed = get_all_specs()["python3"]
    assert listed == {"resource_dir": str(native.resource_dir), "spec": native.to_dict()}


def test_python_alias_on_disk_and_override(env: Env) -> None:
    """"python" means python3 unless a kernel literally named python exists."""
    env.spec(env.p1, "python3", {"argv": ["python3", "-m", "ipykernel_launcher"]})
    assert get_kernel_spec("python").resource_dir == env.p1 / "kernels" / "python3"
    assert get_kernel_spec("python").name == "python3"
    env.spec(env.p2, "python", {"argv": ["custom"]})
    assert get_kernel_spec("python").argv == ("custom",)


# -- comparison with jupyter_client ----------------------------------------------------


def test_listing_matches_jupyter_kernelspec_list(env: Env) -> None:
    """get_all_specs() and find_kernel_specs() agree with `jupyter kernelspec list --json`."""
    env.spec(env.p1, "Alpha", {"argv": ["alpha", "{connection_file}"], "display_name": "A",
                               "language": "a", "env": {"X": "${HOME}/x"},
                               "metadata": {"debugger": False}, "interrupt_mode": "message"})
    env.spec(env.p2, "alpha", {"argv": ["shadowed"], "display_name": "B", "language": "b"})
    env.spec(env.p2, "beta", {"argv": ["beta"], "display_name": "Beta", "language": "b",
                              "kernel_protocol_version": "5.3"})
    env.spec(env.data, "gamma", {"argv": ["g"], "display_name": "G", "language": "g"})
    env.spec(env.root / "userbase" / "share" / "jupyter", "delta", {"argv": ["d"]})
    env.spec(env.p1, "broken", raw="{")
    out = subprocess.run(
        [sys.executable, "-m", "jupyter_client.kernelspecapp", "list", "--json"],
        env=_subprocess_env(env), capture_output=True, text=True, check=True, timeout=60,
    )
    theirs = json.loads(out.stdout)["kernelspecs"]
    ours = get_all_specs()
    assert set(ours) == set(theirs)
    expected = {"alpha", "beta", "gamma", "python3"}
    if site.ENABLE_USER_SITE:  # the user base is searched only where user site is on (not in venvs)
        expected.add("delta")
    assert expected <= set(ours)
    for name, entry in theirs.items():
        assert ours[name]["resource_dir"] == entry["resource_dir"], name
        assert ours[name]["spec"] == entry["spec"], name
    found = find_kernel_specs()
    assert {k: str(v) for k, v in found.items() if k != "broken"} == {
        k: v["resource_dir"] for k, v in theirs.items()
    }


# -- KernelSpec value ----------------------------------------------------------------


def test_spec_value_round_trip_and_read_only(tmp_path: Path) -> None:
    """from_dict/to_dict round-trip; env and metadata are read-only copies."""
    data: dict[str, Any] = {
        "argv": ["k", "-f", "{connection_file}"], "display_name": "K", "language": "k",
        "interrupt_mode": "Message", "env": {"A": "1"}, "metadata": {"m": [1]},
        "kernel_protocol_version": "5.5", "unknown": True,
    }
    spec = KernelSpec.from_dict("k", data, tmp_path)
    assert spec.interrupt_mode == "message"
    data["env"]["A"] = "changed"
    data["metadata"]["m"].append(2)
    assert spec.env == {"A": "1"} and spec.metadata == {"m": [1]}
    with pytest.raises(TypeError):
        spec.env["B"] = "2"  # type: ignore[index]
    out = spec.to_dict()
    assert out["argv"] == ["k", "-f", "{connection_file}"] and out["interrupt_mode"] == "message"
    assert KernelSpec.from_dict("k", out, tmp_path) == spec
    with pytest.raises(KernelSpecError) as info:
        KernelSpec.from_dict("bad/name", data, tmp_path, path="/x/kernel.json")
    assert info.value.field == "name" and info.value.path == "/x/kernel.json"


# -- templating ----------------------------------------------------------------------


def test_format_kernel_cmd(tmp_path: Path) -> None:
    """Templates are filled in every element, python names map to sys.executable, extras append."""
    major, minor = sys.version_info[:2]
    spec = KernelSpec(
        name="t", display_name="T", language="python", resource_dir=tmp_path,
        argv=("python", "-m", "x", "-f", "{connection_file}", "--res={resource_dir}",
              "{prefix}/lib", "{unknown}", "{{connection_file}}"),
    )
    cmd = format_kernel_cmd(spec, "/run/c.json", extra_arguments=["--e={connection_file}"])
    assert cmd == [
        sys.executable, "-m", "x", "-f", "/run/c.json", f"--res={tmp_path}",
        f"{sys.prefix}/lib", "{unknown}", "{/run/c.json}", "--e=/run/c.json",
    ]
    assert format_kernel_cmd(spec, "c", prefix="/opt/p")[6] == "/opt/p/lib"
    for exe, mapped in [(f"python{major}", True), (f"python{major}.{minor}", True),
                        (f"python{major}.{minor + 1}", False), ("/usr/bin/python", False),
                        ("python2", False)]:
        other = KernelSpec(name="t", display_name="", language="", resource_dir=tmp_path,
                           argv=(exe, "{connection_file}"))
        assert format_kernel_cmd(other, "c")[0] == (sys.executable if mapped else exe)


def test_expand_env() -> None:
    """$VAR and ${VAR} come from base; unknown or malformed references stay as written."""
    base = {"HOME": "/home/u", "PATH": "/bin"}
    spec_env = {
        "A": "${HOME}/x", "B": "$HOME", "C": "${NOPE}-$NOPE", "D": "$$HOME",
        "E": "plain", "F": "${PATH}:/extra", "G": "50$",
    }
    assert expand_env(spec_env, base) == {
        "A": "/home/u/x", "B": "/home/u", "C": "${NOPE}-$NOPE", "D": "$HOME",
        "E": "plain", "F": "/bin:/extra", "G": "50$",
    }
