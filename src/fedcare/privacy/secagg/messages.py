"""The messages of one SecAgg+ round, as pydantic models (JSON with base64 bytes on the wire)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from fedcare.federation.messages import SHA256_HEX, SITE_NAME

SHARE_HEX = r"^[0-9a-f]{1,66}$"
Site = Annotated[str, Field(pattern=SITE_NAME)]
ShareHex = Annotated[str, Field(pattern=SHARE_HEX)]


class SecAggMessage(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )

    study_hash: str = Field(pattern=SHA256_HEX)
    round: int = Field(ge=1)


class KeyAdvertisement(SecAggMessage):
    """A site's two fresh public keys for this round, signed with its identity key."""

    site: str = Field(pattern=SITE_NAME)
    encryption_key: bytes = Field(min_length=32, max_length=32)
    mask_key: bytes = Field(min_length=32, max_length=32)
    certificate: str = Field(max_length=8192, description="The site's PEM certificate.")
    signature: bytes = Field(max_length=256)

    def signed_bytes(self) -> bytes:
        """What the signature covers: purpose, study, round, site and both keys."""
        head = f"fedcare-secagg-advertise\x1f{self.study_hash}\x1f{self.round}\x1f{self.site}\x1f"
        return head.encode() + self.encryption_key + self.mask_key


class EncryptedShare(SecAggMessage):
    """One sender's shares for one recipient, sealed under their pairwise key."""

    sender: str = Field(pattern=SITE_NAME)
    recipient: str = Field(pattern=SITE_NAME)
    ciphertext: bytes = Field(max_length=512)


class ShareBundle(SecAggMessage):
    """Everything a site sends in the share-keys stage."""

    sender: str = Field(pattern=SITE_NAME)
    shares: tuple[EncryptedShare, ...]


class UnmaskRequest(SecAggMessage):
    """The coordinator's request: which sites submitted and which dropped out."""

    survivors: tuple[Site, ...]
    dropped: tuple[Site, ...]


class UnmaskReply(SecAggMessage):
    """A survivor's shares: self-mask seeds of survivors, mask keys of dropped sites (hex)."""

    site: str = Field(pattern=SITE_NAME)
    seed_shares: dict[Site, ShareHex]
    key_shares: dict[Site, ShareHex]
