"""Secrets at rest (delivery.secrets): sealed under the first key, opened by any, plaintext from
before still read, and DELIVERY_SECRETS_KEY checked at start-up without ever being echoed."""

import os

import pytest
from cryptography.fernet import Fernet

from delivery.errors import ConfigError
from delivery.secrets import NO_KEYS, SecretBox, generate_key, is_sealed, parse_keys
from delivery.settings import load_settings
from delivery.signing import generate_private_key, generate_secret

OLD, NEW = generate_key(), generate_key()


def test_a_sealed_secret_is_self_describing_and_holds_no_plaintext():
    secret = generate_secret()
    stored = SecretBox([OLD]).seal(secret)
    assert stored.startswith("fernet:") and is_sealed(stored)
    assert secret.removeprefix("whsec_") not in stored
    # It is a plain Fernet token under the key: any Fernet implementation opens it.
    assert Fernet(OLD).decrypt(stored.removeprefix("fernet:")).decode() == secret
    assert SecretBox([OLD]).open(stored) == secret


def test_each_seal_is_a_new_token_and_sealing_twice_changes_nothing():
    box = SecretBox([OLD])
    secret = generate_private_key()
    first, second = box.seal(secret), box.seal(secret)
    assert first != second  # a fresh IV: equal secrets do not show as equal rows
    assert box.seal(first) == first


def test_without_a_key_secrets_are_written_and_read_as_they_are():
    secret = generate_secret()
    assert NO_KEYS.seal(secret) == secret
    assert NO_KEYS.open(secret) == secret
    assert not NO_KEYS.has_key


def test_the_first_key_seals_and_every_key_opens():
    sealed_by_old = SecretBox([OLD]).seal("whsec_old")
    both = SecretBox([NEW, OLD])
    assert both.open(sealed_by_old) == "whsec_old"
    sealed_by_both = both.seal("whsec_new")
    assert SecretBox([NEW]).open(sealed_by_both) == "whsec_new"
    assert not SecretBox([OLD]).opens(sealed_by_both)


def test_a_sealed_secret_no_key_opens_is_left_sealed_for_signing_to_refuse():
    sealed = SecretBox([OLD]).seal("whsec_x")
    for box in (NO_KEYS, SecretBox([NEW])):
        assert box.open(sealed) == sealed
        assert not box.opens(sealed)
    assert NO_KEYS.opens("whsec_plaintext_from_before")


def test_reseal_moves_a_secret_to_the_first_key_and_skips_what_is_there_already():
    box = SecretBox([NEW, OLD])
    under_old = SecretBox([OLD]).seal("whsk_a")
    moved = box.reseal(under_old)
    assert moved is not None and SecretBox([NEW]).open(moved) == "whsk_a"
    assert box.reseal(moved) is None  # already under the first key: nothing to write
    plaintext = box.reseal("whsk_b")
    assert plaintext is not None and SecretBox([NEW]).open(plaintext) == "whsk_b"
    foreign = SecretBox([generate_key()]).seal("whsk_c")
    assert box.reseal(foreign) is None and not box.opens(foreign)


def test_an_opened_secret_is_decrypted_once_per_process():
    box = SecretBox([OLD])
    sealed = SecretBox([OLD]).seal("whsec_once")
    for _ in range(1000):  # a worker loads its subscriptions every batch
        assert box.open(sealed) == "whsec_once"
    info = box._open_token.cache_info()
    assert (info.misses, info.hits) == (1, 999)


def test_keys_are_comma_separated_and_each_must_be_a_fernet_key():
    assert parse_keys(f"{NEW}, {OLD}") == (NEW, OLD)
    assert parse_keys("") == ()
    with pytest.raises(ValueError, match=r"^key 2 is not a Fernet key"):
        parse_keys(f"{NEW},{OLD[:-4]}")
    with pytest.raises(ValueError, match="at most 8"):
        parse_keys(",".join(generate_key() for _ in range(9)))


@pytest.fixture
def env(monkeypatch):
    for name in [n for n in os.environ if n.startswith("DELIVERY_")]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DELIVERY_DATABASE_URL", "postgresql://x@127.0.0.1/db")
    return monkeypatch


def test_a_bad_key_stops_start_up_naming_the_variable_not_the_value(env):
    secret_looking = "c2VjcmV0LWJ1dC1ub3QtYS1mZXJuZXQta2V5"
    env.setenv("DELIVERY_SECRETS_KEY", f"{NEW},{secret_looking}")
    with pytest.raises(ConfigError, match=r"^DELIVERY_SECRETS_KEY: key 2 is not a Fernet key"):
        load_settings(require=("database_url",))
    try:
        load_settings(require=("database_url",))
    except ConfigError as exc:
        assert secret_looking not in str(exc) and NEW not in str(exc)


def test_the_key_is_never_shown_by_the_settings_object(env):
    env.setenv("DELIVERY_SECRETS_KEY", NEW)
    settings = load_settings(require=("database_url",))
    assert settings.secrets_key.get_secret_value() == NEW
    assert NEW not in repr(settings) and NEW not in str(settings)
    assert SecretBox.from_text(settings.secrets_key.get_secret_value()).has_key
