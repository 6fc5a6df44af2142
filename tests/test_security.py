"""LAN safety: binding and password, allowed model folders with real symlinks, output names."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ortho_mecha import security
from ortho_mecha.errors import OrthoMechaError

# --- binding and password ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [None, "", "  ", "0.0.0.0", "::", "[::]", "192.168.1.20", "10.0.0.5", "fe80::1", "myhost.lan", "::ffff:10.0.0.1"],
)
def test_addresses_reachable_from_other_machines(address: str | None) -> None:
    assert security.is_lan_address(address)
    assert security.password_required(address)


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST", " localhost ", "::ffff:127.0.0.1"]
)
def test_loopback_addresses(address: str) -> None:
    assert not security.is_lan_address(address)
    assert not security.password_required(address)


def test_serving_other_machines_without_password_is_refused() -> None:
    with pytest.raises(OrthoMechaError, match=r"every network interface.*ORTHO_MECHA_PASSWORD.*127\.0\.0\.1"):
        security.require_password_for_lan("", None)
    with pytest.raises(OrthoMechaError, match=r"bound to address 192\.168\.1\.20"):
        security.require_password_for_lan("192.168.1.20", None)
    security.require_password_for_lan("192.168.1.20", "secret")
    security.require_password_for_lan("127.0.0.1", None)


@pytest.fixture
def no_password_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(security.PASSWORD_VARIABLE, raising=False)


@pytest.mark.usefixtures("no_password_variable")
def test_password_from_environment_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(security.PASSWORD_VARIABLE, "from-env")
    assert security.configured_password({security.PASSWORD_VARIABLE: "from-secrets"}) == "from-env"
    assert security.configured_password(None) == "from-env"


@pytest.mark.usefixtures("no_password_variable")
@pytest.mark.parametrize("environment", ["", "   "])
def test_empty_environment_password_counts_as_unset(monkeypatch: pytest.MonkeyPatch, environment: str) -> None:
    monkeypatch.setenv(security.PASSWORD_VARIABLE, environment)
    assert security.configured_password({security.PASSWORD_VARIABLE: "from-secrets"}) == "from-secrets"
    assert security.configured_password({}) is None
    assert security.configured_password(None) is None


@pytest.mark.usefixtures("no_password_variable")
def test_password_from_secrets() -> None:
    assert security.configured_password({security.PASSWORD_VARIABLE: " spaced pass "}) == " spaced pass "
    assert security.configured_password({security.PASSWORD_VARIABLE: ""}) is None
    assert security.configured_password({"other": "x"}) is None
    with pytest.raises(OrthoMechaError, match="must be text, got a int; write it in quotes"):
        security.configured_password({security.PASSWORD_VARIABLE: 1234})


@pytest.fixture
def streamlit_secrets(tmp_path: Path) -> Iterator[tuple[Path, Mapping[str, object]]]:
    """A real ``st.secrets`` object reading ``tmp_path/secrets.toml`` (tests may import streamlit; the library not)."""
    from streamlit import config
    from streamlit.runtime.secrets import Secrets

    path = tmp_path / "secrets.toml"
    previous = config.get_option("secrets.files")
    config.set_option("secrets.files", [str(path)])
    yield path, Secrets()
    config.set_option("secrets.files", previous)


@pytest.mark.usefixtures("no_password_variable")
def test_streamlit_secrets_without_a_file_mean_no_password(
    streamlit_secrets: tuple[Path, Mapping[str, object]],
) -> None:
    _, secrets = streamlit_secrets
    assert security.configured_password(secrets) is None


@pytest.mark.usefixtures("no_password_variable")
def test_a_broken_streamlit_secrets_file_is_reported_not_ignored(
    streamlit_secrets: tuple[Path, Mapping[str, object]],
) -> None:
    path, secrets = streamlit_secrets
    path.write_text('ORTHO_MECHA_PASSWORD = "unterminated\n')
    with pytest.raises(OrthoMechaError, match="cannot read the Streamlit secrets: Error parsing secrets file"):
        security.configured_password(secrets)


def test_check_password() -> None:
    assert security.check_password("correct horse", "correct horse")
    assert not security.check_password("correct hors", "correct horse")
    assert not security.check_password("", "correct horse")
    assert security.check_password("pässwörd", "pässwörd")  # non-ASCII passwords compare as UTF-8 bytes
    assert not security.check_password("passwörd", "pässword")
    assert not security.check_password("", "")  # no password set never lets anyone in


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_wrong_passwords_make_the_client_wait_longer_and_longer() -> None:
    clock = _Clock()
    limiter = security.SignInLimiter(free=3, first_wait=2.0, max_wait=10.0, clock=clock)
    for _ in range(3):
        assert security.attempt_sign_in("guess", "right", "10.0.0.9", limiter) == "wrong password"
    assert limiter.wait_seconds("10.0.0.9") == 2.0
    assert limiter.wait_seconds("10.0.0.7") == 0.0  # another address is not held up
    refused = security.attempt_sign_in("right", "right", "10.0.0.9", limiter)
    assert refused == "too many wrong passwords from this address: try again in 2 s"  # not even checked
    clock.now += 2.0
    assert security.attempt_sign_in("guess", "right", "10.0.0.9", limiter) == "wrong password"
    assert limiter.wait_seconds("10.0.0.9") == 4.0  # doubled
    for _ in range(5):
        clock.now += limiter.wait_seconds("10.0.0.9")
        limiter.failed("10.0.0.9")
    assert limiter.wait_seconds("10.0.0.9") == 10.0  # capped
    clock.now += 10.0
    assert security.attempt_sign_in("right", "right", "10.0.0.9", limiter) is None
    limiter.failed("10.0.0.9")
    assert limiter.wait_seconds("10.0.0.9") == 0.0  # a right password started the count over


def test_the_sign_in_limiter_forgets_quiet_clients_and_stays_bounded() -> None:
    clock = _Clock()
    limiter = security.SignInLimiter(free=1, first_wait=5.0, forget_after=60.0, max_clients=3, clock=clock)
    limiter.failed("a")
    assert limiter.wait_seconds("a") == 5.0
    clock.now += 61.0
    assert limiter.wait_seconds("a") == 0.0
    for client in ("b", "c", "d", "e"):
        limiter.failed(client)
    assert [limiter.wait_seconds(client) > 0 for client in "bcde"] == [False, True, True, True]


# --- model folders -------------------------------------------------------------------------------


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for variable in (security.ROOTS_VARIABLE, security.WORKSPACE_VARIABLE, security.COMFYUI_VARIABLE):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_default_workspace_and_roots(clean_environment: Path) -> None:
    assert security.workspace_dir() == clean_environment / "ortho-mecha-workspace"
    assert security.allowed_roots() == [clean_environment / "ortho-mecha-workspace"]


def test_workspace_from_environment(clean_environment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(security.WORKSPACE_VARIABLE, "~/work space")
    assert security.workspace_dir() == clean_environment / "work space"
    assert security.allowed_roots() == [clean_environment / "work space"]


def test_comfyui_model_folders_are_added(clean_environment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(security.COMFYUI_VARIABLE, "/opt/ComfyUI")
    assert security.allowed_roots() == [
        clean_environment / "ortho-mecha-workspace",
        Path("/opt/ComfyUI/models/diffusion_models"),
        Path("/opt/ComfyUI/models/checkpoints"),
    ]


def test_configured_roots_replace_the_defaults(clean_environment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(security.COMFYUI_VARIABLE, "/opt/ComfyUI")
    monkeypatch.setenv(security.ROOTS_VARIABLE, os.pathsep.join(["/data/models", "", "~/more", "/data/models"]))
    assert security.allowed_roots() == [Path("/data/models"), clean_environment / "more"]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A root with models, links inside and out, a link loop and a pickle; a sibling folder outside it."""
    base = tmp_path_factory.mktemp("layout")
    root, outside, sibling = base / "root", base / "outside", base / "root2"
    (root / "models" / "sub").mkdir(parents=True)
    outside.mkdir()
    sibling.mkdir()
    for path in (
        root / "models" / "a.safetensors",
        root / "models" / "sub" / "b.safetensors",
        root / "old.ckpt",
        root / "notes.txt",
        outside / "secret.safetensors",
        outside / "passwd",
        sibling / "c.safetensors",
    ):
        path.write_bytes(b"x")
    (root / "models" / "folder.safetensors").mkdir()
    (root / "escape.safetensors").symlink_to(outside / "secret.safetensors")
    (root / "alias.safetensors").symlink_to(root / "models" / "a.safetensors")
    (root / "relative-alias.safetensors").symlink_to(Path("models") / "sub" / "b.safetensors")
    (root / "pickle.safetensors").symlink_to(root / "old.ckpt")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "loop.safetensors").symlink_to(root / "loop.safetensors")
    return {"root": root, "outside": outside, "sibling": sibling}


def test_a_model_inside_the_root_resolves(layout: dict[str, Path]) -> None:
    root = layout["root"]
    real = (root / "models" / "a.safetensors").resolve()
    assert security.resolve_model_path("models/a.safetensors", [root]) == real
    assert security.resolve_model_path(root / "models" / "a.safetensors", [root]) == real
    assert security.resolve_model_path(str(root / "models" / "sub" / ".." / "a.safetensors"), [root]) == real
    assert security.resolve_model_path("alias.safetensors", [root]) == real  # a link that stays inside is fine
    b = (root / "models" / "sub" / "b.safetensors").resolve()
    assert security.resolve_model_path("relative-alias.safetensors", [root]) == b


def test_a_relative_path_is_looked_up_in_each_root(layout: dict[str, Path]) -> None:
    roots = [layout["root"], layout["sibling"]]
    assert security.resolve_model_path("c.safetensors", roots) == (layout["sibling"] / "c.safetensors").resolve()


@pytest.mark.parametrize(
    "user_path",
    [
        "../../etc/passwd",
        "../outside/secret.safetensors",
        "models/../../outside/secret.safetensors",
        "/etc/passwd",
        "escape.safetensors",  # a link inside the root pointing out of it
        "linkdir/secret.safetensors",  # a linked folder pointing out of the root
    ],
)
def test_paths_leading_outside_the_roots_are_refused(layout: dict[str, Path], user_path: str) -> None:
    with pytest.raises(OrthoMechaError, match="outside the allowed model folders") as caught:
        security.resolve_model_path(user_path, [layout["root"]])
    assert str(caught.value).startswith(f"{user_path}: ")
    assert str(layout["root"]) in str(caught.value)


def test_absolute_paths_elsewhere_are_refused(layout: dict[str, Path]) -> None:
    for path in (layout["outside"] / "secret.safetensors", layout["sibling"] / "c.safetensors"):
        with pytest.raises(OrthoMechaError, match="outside the allowed model folders"):
            security.resolve_model_path(path, [layout["root"]])  # root2 shares a prefix with root, nothing more


def test_only_safetensors_files_are_accepted(layout: dict[str, Path]) -> None:
    root = layout["root"]
    with pytest.raises(OrthoMechaError, match=r"old\.ckpt: not a \.safetensors file; .*never opened"):
        security.resolve_model_path("old.ckpt", [root])
    with pytest.raises(OrthoMechaError, match=r"not a \.safetensors file \(it links to old\.ckpt\)"):
        security.resolve_model_path("pickle.safetensors", [root])


def test_missing_and_unusable_paths_are_refused_clearly(layout: dict[str, Path]) -> None:
    root = layout["root"]
    with pytest.raises(OrthoMechaError, match=r"^missing\.safetensors: no such model file"):
        security.resolve_model_path("missing.safetensors", [root])
    with pytest.raises(OrthoMechaError, match="no such model file"):
        security.resolve_model_path("models/folder.safetensors", [root])
    with pytest.raises(OrthoMechaError, match="symlink loop"):
        security.resolve_model_path("loop.safetensors", [root])
    with pytest.raises(OrthoMechaError, match="no model file given"):
        security.resolve_model_path("  ", [root])
    with pytest.raises(OrthoMechaError, match="NUL"):
        security.resolve_model_path("a\0.safetensors", [root])
    with pytest.raises(OrthoMechaError, match="none configured; set ORTHO_MECHA_ROOTS"):
        security.resolve_model_path("models/a.safetensors", [])


def test_list_models(layout: dict[str, Path]) -> None:
    root = layout["root"]
    expected = [root / "models" / "a.safetensors", root / "models" / "sub" / "b.safetensors"]
    assert security.list_models([root]) == expected
    assert security.list_models([root, root / "models", layout["root"] / "missing"]) == expected
    assert security.list_models([layout["sibling"], root]) == [*expected, layout["sibling"] / "c.safetensors"]
    for path in security.list_models([root]):
        assert security.resolve_model_path(path, [root]) == path.resolve()


def test_a_file_reached_from_two_roots_is_listed_once_by_its_own_path(tmp_path: Path) -> None:
    first, second = tmp_path.resolve() / "first", tmp_path.resolve() / "second"
    first.mkdir()
    second.mkdir()
    (second / "model.safetensors").write_bytes(b"x")
    (first / "a-link.safetensors").symlink_to(second / "model.safetensors")
    assert security.list_models([first, second]) == [second / "model.safetensors"]
    assert security.list_models([first]) == []  # its target is outside the only root
    (first / "linked-folder").symlink_to(second)
    assert security.scan_models([first]) == ([], [first / "a-link.safetensors", first / "linked-folder"])  # said
    assert security.scan_models([first, second]) == ([second / "model.safetensors"], [])  # inside: no news


_FOLDERS = [".", "..", "models", "sub", "linkdir"]
_FILES = ["a", "b", "escape", "secret", "alias", "pickle", "loop"]
_PIECES = st.sampled_from([*_FOLDERS, *(f"{name}.safetensors" for name in _FILES)])


@given(st.lists(_PIECES, min_size=1, max_size=6), st.booleans())
def test_whatever_is_accepted_lies_inside_the_root(layout: dict[str, Path], pieces: list[str], absolute: bool) -> None:
    root = layout["root"]
    user_path = str(root.joinpath(*pieces)) if absolute else os.path.join(*pieces)
    try:
        real = security.resolve_model_path(user_path, [root])
    except OrthoMechaError:
        return
    assert real.is_relative_to(root.resolve())
    assert real.is_file() and real.suffix == ".safetensors"


# --- output names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("merged", "merged.safetensors"),
        ("merged.safetensors", "merged.safetensors"),
        ("My Model v2", "My Model v2.safetensors"),
        ("a-b_c.1", "a-b_c.1.safetensors"),
        ("LOUD.SAFETENSORS", "LOUD.safetensors"),  # the suffix merge (sd-mecha) writes
        ("7up", "7up.safetensors"),
    ],
)
def test_good_output_names(name: str, expected: str) -> None:
    assert security.validate_output_name(name) == expected


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "needs a file name"),
        ("../evil", "not a path"),
        ("sub/model", "not a path"),
        ("sub\\model", "not a path"),
        ("x..y", "must not contain '..'"),
        (".hidden", "must start with a letter or a digit"),
        ("-rf", "must start with a letter or a digit"),
        (" model", "must start with a letter or a digit"),
        ("model.", "must not end with a dot"),
        ("model ", "must not end with a dot or a space"),
        ("a:b*c", "contains '*' ':'; use only letters"),
        ("naïve", "contains 'ï'"),
        ("line\nbreak", "contains '\\n'"),
        ("m" * 190, "use at most 200"),
        ("out.ckpt", "merges are written as safetensors; name it out.safetensors"),
        ("out.PT", "name it out.safetensors"),
    ],
)
def test_bad_output_names(name: str, message: str) -> None:
    with pytest.raises(OrthoMechaError, match=re.escape(message)):
        security.validate_output_name(name)


@given(st.text(max_size=40))
def test_any_accepted_output_name_is_a_plain_safetensors_name(name: str) -> None:
    try:
        accepted = security.validate_output_name(name)
    except OrthoMechaError:
        return
    assert Path(accepted).name == accepted
    assert accepted.lower().endswith(".safetensors")
    assert ".." not in accepted and accepted[0].isalnum() and accepted.isascii()
    assert security.validate_output_name(accepted) == accepted
