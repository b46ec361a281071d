"""The Kafka security settings: plaintext by default, credentials complete or refused at
start-up, and the same connection arguments for every client."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from gozon.core.settings import MessagingSettings
from gozon.messaging.kafka import KafkaAccess


def test_the_default_is_the_local_stacks_plaintext_listener() -> None:
    settings = MessagingSettings()
    assert settings.kafka_create_topics is True
    assert KafkaAccess.from_settings(settings).client_args() == {
        "bootstrap_servers": "127.0.0.1:9092",
        "security_protocol": "PLAINTEXT",
    }


def test_scram_reads_the_password_from_the_mounted_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("GOZON_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("GOZON_KAFKA_SASL_USERNAME", "gozon-orders")
    monkeypatch.setenv("GOZON_KAFKA_SASL_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("GOZON_KAFKA_CREATE_TOPICS", "false")
    settings = MessagingSettings()
    access = KafkaAccess.from_settings(settings)
    assert settings.kafka_create_topics is False
    assert access.client_args() == {
        "bootstrap_servers": "127.0.0.1:9092",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "gozon-orders",
        "sasl_plain_password": "s3cret",
    }
    assert "s3cret" not in repr(access)
    assert "s3cret" not in repr(settings)


def self_signed_ca() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cluster-ca")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_tls_trusts_the_given_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(self_signed_ca())
    settings = MessagingSettings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="u",
        kafka_sasl_password="p",
        kafka_ssl_ca_file=ca,
    )
    context = KafkaAccess.from_settings(settings).client_args()["ssl_context"]
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert len(context.get_ca_certs()) == 1


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kafka_security_protocol": "SASL_PLAINTEXT"}, "needs GOZON_KAFKA_SASL_USERNAME"),
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "u"},
            "exactly one of GOZON_KAFKA_SASL_PASSWORD_FILE and GOZON_KAFKA_SASL_PASSWORD",
        ),
        (
            {
                "kafka_security_protocol": "SASL_PLAINTEXT",
                "kafka_sasl_username": "u",
                "kafka_sasl_password": "p",
                "kafka_sasl_password_file": "/etc/password",
            },
            "exactly one of",
        ),
        (
            {
                "kafka_security_protocol": "SASL_PLAINTEXT",
                "kafka_sasl_username": "u",
                "kafka_sasl_password_file": "/nonexistent/password",
            },
            "GOZON_KAFKA_SASL_PASSWORD_FILE /nonexistent/password is missing",
        ),
        (
            {"kafka_sasl_username": "u", "kafka_sasl_password": "p"},
            "PLAINTEXT does not authenticate",
        ),
        (
            {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_ssl_ca_file": "/etc/ca.crt"},
            "needs GOZON_KAFKA_SASL_USERNAME",
        ),
        ({"kafka_ssl_ca_file": "/etc/ca.crt"}, "does not use TLS"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": "/nonexistent/ca.crt"},
            "GOZON_KAFKA_SSL_CA_FILE /nonexistent/ca.crt is missing",
        ),
        ({"kafka_security_protocol": "SASL_SCRAM"}, "kafka_security_protocol"),
        ({"kafka_sasl_mechanism": "GSSAPI"}, "kafka_sasl_mechanism"),
    ],
)
def test_an_incomplete_or_contradictory_kafka_security_setting_fails_at_start(
    values: dict[str, str], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        MessagingSettings(**values)  # type: ignore[arg-type]


def test_a_refused_setting_does_not_echo_a_password() -> None:
    with pytest.raises(ValidationError, match="needs GOZON_KAFKA_SASL_USERNAME") as caught:
        MessagingSettings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_password="t0psecret")
    assert "t0psecret" not in str(caught.value)
