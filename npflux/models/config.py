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
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}: expected a dict of fields, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        for name, value in d.items():
            _check_type(cls.__name__, name, fields[name].type, value)
        return cls(**d)


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_type(owner, name, annotation, value):
    """A field read from a file has the type its annotation names (a "64" for n_embd is refused here,
    in one line, instead of failing later in arithmetic); optional fields may be None."""
    annotation = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    optional = "None" in annotation or "Optional" in annotation
    base = annotation.replace("| None", "").replace("Optional[", "").replace("]", "").strip()
    allowed = _TYPES.get(base)
    if allowed is None or (value is None and optional):
        return
    if isinstance(value, bool) and base != "bool" or not isinstance(value, allowed):
        raise ValueError(f"{owner}.{name} must be {base}, got {value!r} ({type(value).__name__})")
