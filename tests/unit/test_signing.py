"""Module signatures: what a guest signs is exactly what a host verifies, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from deadlift.errors import ConfigError
from deadlift.model.orgs import load_orgs
from deadlift.wire import signing
from tests.conftest import ROOT

SHA = "ab" * 32
MODULE = ("acme", "before_charge_action", "3", SHA)


def test_a_signature_verifies_with_the_signers_public_key() -> None:
    seed, public = signing.new_key()
    assert seed.startswith("SU") and public.startswith("U")
    assert signing.public_key(seed) == public
    signature = signing.sign(seed, *MODULE)
    assert signing.verify(public, signature, *MODULE)


@pytest.mark.parametrize("field", range(4), ids=["owner", "name", "version", "sha256"])
def test_a_signature_covers_every_field(field: int) -> None:
    seed, public = signing.new_key()
    signature = signing.sign(seed, *MODULE)
    changed = list(MODULE)
    changed[field] = "cd" * 32 if field == 3 else changed[field] + "x"
    assert not signing.verify(public, signature, *changed)


def test_another_keys_signature_fails() -> None:
    seed, _ = signing.new_key()
    _, other_public = signing.new_key()
    assert not signing.verify(other_public, signing.sign(seed, *MODULE), *MODULE)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "not a key",
        "U" + "A" * 55,  # the shape of a key, a bad checksum
        "SUAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # a seed, not a key
        "NAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # another prefix
    ],
)
def test_a_garbage_key_is_false_not_an_exception(key: str) -> None:
    seed, _ = signing.new_key()
    assert signing.verify(key, signing.sign(seed, *MODULE), *MODULE) is False


@pytest.mark.parametrize("signature", ["", "!!!", "AAAA", "x" * 200, "====", "é"])
def test_a_garbage_signature_is_false_not_an_exception(signature: str) -> None:
    _, public = signing.new_key()
    assert signing.verify(public, signature, *MODULE) is False


def test_a_flipped_signature_byte_fails() -> None:
    seed, public = signing.new_key()
    signature = signing.sign(seed, *MODULE)
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
    assert not signing.verify(public, flipped, *MODULE)


@pytest.mark.parametrize(
    "seed", ["", "SUNOTASEED", "UBA5VKKOGUIAHM6DF7GL4R2CSGTITX6A4HJXMRO2QJWESFMXVLMUNXG4"]
)
def test_a_bad_seed_is_a_config_error_naming_keygen(seed: str) -> None:
    with pytest.raises(ConfigError, match="module keygen"):
        signing.sign(seed, *MODULE)


def test_read_seed_from_a_file_then_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed, _ = signing.new_key()
    (tmp_path / "acme.seed").write_text(seed + "\n")
    assert signing.read_seed(str(tmp_path / "acme.seed")) == seed
    monkeypatch.setenv(signing.SEED_ENV, seed)
    assert signing.read_seed(None) == seed


def test_read_seed_names_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(signing.SEED_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"--key FILE or set {signing.SEED_ENV}"):
        signing.read_seed(None)
    missing = tmp_path / "none.seed"
    with pytest.raises(ConfigError, match=f"--key {missing}: cannot read the signing key"):
        signing.read_seed(str(missing))


def test_the_dev_seed_matches_the_manifests_signing_key() -> None:
    manifest = load_orgs(ROOT / "config" / "orgs.yaml")
    item = manifest.integrations["acme-at-stripe"]
    seed = signing.read_seed(str(ROOT / "config" / "keys" / "acme.seed"))
    assert signing.public_key(seed) == item.signing_key
