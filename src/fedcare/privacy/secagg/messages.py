"""The messages of one SecAgg+ session, as pydantic models (JSON with base64 bytes on the wire).

Every message names the session digest (:attr:`RoundSetup.session`); what a site
signs covers it, so a signature made for one session never counts in another.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from fedcare.ids import SHA256_HEX, SITE_NAME

SHARE_HEX = r"^[0-9a-f]{1,66}$"
Site = Annotated[str, Field(pattern=SITE_NAME)]
ShareHex = Annotated[str, Field(pattern=SHARE_HEX)]


class SecAggMessage(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )

    study_hash: str = Field(pattern=SHA256_HEX)
    round: int = Field(ge=1)
    session: str = Field(pattern=SHA256_HEX, description="The session digest.")


class KeyAdvertisement(SecAggMessage):
    """A site's two fresh public keys for this session, signed with its identity key."""

    site: str = Field(pattern=SITE_NAME)
    encryption_key: bytes = Field(min_length=32, max_length=32)
    mask_key: bytes = Field(min_length=32, max_length=32)
    certificate: str = Field(max_length=8192, description="The site's PEM certificate.")
    signature: bytes = Field(max_length=256)

    def signed_bytes(self) -> bytes:
        """What the signature covers: purpose, the session (participants, graph, threshold,
        task), the site and both keys."""
        head = (
            f"fedcare-secagg-advertise\x1f{self.study_hash}\x1f{self.round}\x1f"
            f"{self.session}\x1f{self.site}\x1f"
        )
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
    """The coordinator's claim of which sites submitted and which dropped out."""

    survivors: tuple[Site, ...]
    dropped: tuple[Site, ...]

    def signed_bytes(self) -> bytes:
        """What a survivor signs to say it was shown exactly this request."""
        return (
            f"fedcare-secagg-survivors\x1f{self.study_hash}\x1f{self.round}\x1f{self.session}"
            f"\x1f{','.join(sorted(self.survivors))}\x1f{','.join(sorted(self.dropped))}"
        ).encode()


class SurvivorSignature(SecAggMessage):
    """A survivor's signature over the unmasking request it was shown (the consistency check)."""

    site: str = Field(pattern=SITE_NAME)
    signature: bytes = Field(max_length=256)


class SurvivorSignatures(SecAggMessage):
    """The signatures the coordinator relays to a survivor before it reveals anything."""

    request: UnmaskRequest
    signatures: tuple[SurvivorSignature, ...]


class UnmaskReply(SecAggMessage):
    """A survivor's shares: self-mask seeds of survivors, mask keys of dropped sites (hex)."""

    site: str = Field(pattern=SITE_NAME)
    seed_shares: dict[Site, ShareHex]
    key_shares: dict[Site, ShareHex]
