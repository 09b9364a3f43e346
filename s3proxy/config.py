"""Settings -> the configs each part of the proxy takes: the one place they are mapped.

``Settings`` is what an operator sets (flags and S3PROXY_* variables); the dataclasses
built here are what the modules consume, each holding only what it needs. Nothing
else reads a Settings field to build one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from s3proxy import checksums, keys
from s3proxy.download_limits import DownloadLimits, download_slots
from s3proxy.form import FormLimits
from s3proxy.pipeline import PipelineConfig
from s3proxy.s3 import ObjectDefaults
from s3proxy.s3_aiobotocore import ClientOptions
from s3proxy.settings import Settings
from s3proxy.webhook import WebhookConfig

if TYPE_CHECKING:
    from s3proxy.embedded import EmbeddedConfig


@dataclass(frozen=True)
class Config:
    """Everything the app derives from its settings."""

    client: ClientOptions  # how to reach S3 (the embedded store's address comes at start)
    objects: ObjectDefaults  # what every created object gets
    pipeline: PipelineConfig  # one file's journey into S3
    form: FormLimits  # what a multipart/form-data request may hold
    downloads: DownloadLimits  # how slowly a download may be read, and how many at once
    webhook: WebhookConfig | None  # where completions are announced, if anywhere

    @classmethod
    def from_settings(cls, settings: Settings) -> Config:
        objects = object_defaults(settings)
        return cls(
            client=client_options(settings),
            objects=objects,
            pipeline=PipelineConfig(
                part_size=settings.part_size,
                parts_in_flight=settings.parts_in_flight,
                max_file_size=settings.max_file_size,
                chunk_size=settings.read_buffer,
                allow_types=settings.allow_type,
                objects=objects,
                min_rate=settings.min_upload_rate,
                max_fields_size=settings.max_fields_size,
                writes=keys.write_policy(settings.key_template, settings.no_overwrite),
                checksum=checksums.resolve_mode(settings.checksum),
                late_write_window=2 * settings.s3_read_timeout,
            ),
            form=FormLimits(
                max_files=settings.max_files,
                max_fields=settings.max_fields,
                max_field_size=settings.max_field_size,
                max_request_size=settings.max_request_size,
                chunk_size=settings.read_buffer,
                idle_timeout=settings.client_timeout,
                min_rate=settings.min_upload_rate,
                rate_window=settings.min_rate_window,
                max_fields_size=settings.max_fields_size,
            ),
            downloads=DownloadLimits(
                idle_timeout=settings.client_timeout,
                min_rate=settings.min_download_rate,
                rate_window=settings.min_rate_window,
                slots=download_slots(settings.s3_max_connections),
            ),
            webhook=webhook_config(settings),
        )


def client_options(settings: Settings) -> ClientOptions:
    """The S3 client's settings. With the embedded store the endpoint and keys are the
    store's (``embedded.store_access``), filled in by whoever starts or finds it."""
    return ClientOptions(
        endpoint_url=settings.endpoint_url,
        region=settings.region,
        connect_timeout=settings.s3_connect_timeout,
        read_timeout=settings.s3_read_timeout,
        max_attempts=settings.s3_max_attempts,
        max_connections=settings.s3_max_connections,
        sign_payload=settings.sign_payload,
        request_checksum=settings.request_checksum,
        lean_parts=settings.lean_upload_part,
    )


def webhook_config(settings: Settings) -> WebhookConfig | None:
    if settings.webhook_url is None:
        return None
    return WebhookConfig(
        url=settings.webhook_url,
        secret=settings.webhook_secret.encode() if settings.webhook_secret else None,
        timeout=settings.webhook_timeout,
        max_attempts=settings.webhook_attempts,
    )


def object_defaults(settings: Settings) -> ObjectDefaults:
    return ObjectDefaults(
        acl=settings.acl,
        storage_class=settings.storage_class,
        sse=settings.sse,
        sse_kms_key_id=settings.sse_kms_key_id,
    )


def embedded_config(settings: Settings) -> EmbeddedConfig:
    """The embedded SeaweedFS store as the settings describe it."""
    from s3proxy.embedded import Backoff, EmbeddedConfig

    return EmbeddedConfig(
        data_dir=settings.data_dir,
        bucket=settings.bucket_name,
        s3_port=settings.embedded_s3_port,
        restart=Backoff(settings.embedded_restart_delay, settings.embedded_restart_max_delay),
    )
