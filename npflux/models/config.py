"""What every model config shares: a JSON-able dict out, and back in with unknown fields refused."""
import dataclasses


class ConfigDict:
    """Mixin for a dataclass config: ``to_dict`` and a strict ``from_dict``.

    A checkpoint stores its config as a dict; a field this version does not
    know means the checkpoint is from another model or version, so loading
    it must fail loudly rather than drop the field.
    """

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        return cls(**d)
