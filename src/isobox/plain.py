"""Dataclass-like value classes without `import dataclasses`.

dataclasses imports inspect (with ast, dis, tokenize...): ~12-15 ms of every runtime call,
plus ~0.5 ms per class to generate its methods. The classes on the runtime's hot path
write their __init__ by hand and get a dataclass's __eq__ / __repr__ (and, when frozen,
__hash__ and read-only fields) from these bases, keyed on the field names in _FIELDS.
"""
from __future__ import annotations

__all__ = ["Plain", "Frozen"]


class Plain:
    """A mutable record: eq and repr like @dataclass (unhashable, like it)."""
    _FIELDS: tuple[str, ...] = ()

    def _values(self) -> tuple:
        return tuple(getattr(self, n) for n in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._values() == other._values()  # type: ignore[attr-defined]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{self.__class__.__qualname__}(" + ", ".join(
            f"{n}={getattr(self, n)!r}" for n in self._FIELDS) + ")"


class Frozen(Plain):
    """An immutable record (like @dataclass(frozen=True)): __init__ sets its fields with
    self._set(name=value, ...); assigning or deleting a field afterwards raises."""
    __slots__ = ()

    def _set(self, **values: object) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(self._values())

    def __reduce__(self):
        return (self.__class__, self._values())


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make):
        self.make = make


def field(*, default_factory):
    """dataclasses.field(default_factory=...), the only form used with record()."""
    return _Factory(default_factory)


def record(cls=None, *, frozen: bool = False):
    """A stand-in for @dataclass / @dataclass(frozen=True) on plain annotated classes: the
    fields are the class's own annotations in order, class attributes their defaults
    (field(default_factory=...) for mutable ones); __init__ (then __post_init__ if any),
    __eq__, __repr__ and, when frozen, __hash__ and read-only fields, as a dataclass has.
    No code generation, so defining a class costs microseconds instead of ~0.5 ms."""
    def wrap(cls):
        names = tuple(cls.__dict__.get("__annotations__", {}))
        known = frozenset(names)
        defaults = {}
        for n in names:
            if n in cls.__dict__:
                defaults[n] = cls.__dict__[n]
                if isinstance(defaults[n], _Factory):
                    delattr(cls, n)
        set_field = object.__setattr__
        qual = cls.__qualname__

        def __init__(self, *args, **kw):
            if len(args) > len(names):
                raise TypeError(f"{qual}.__init__() takes {len(names) + 1} positional arguments but "
                                f"{len(args) + 1} were given")
            values = dict(zip(names, args))
            for k, v in kw.items():
                if k not in known:
                    raise TypeError(f"{qual}.__init__() got an unexpected keyword argument '{k}'")
                if k in values:
                    raise TypeError(f"{qual}.__init__() got multiple values for argument '{k}'")
                values[k] = v
            for n in names:
                if n in values:
                    v = values[n]
                elif n in defaults:
                    v = defaults[n]
                    if isinstance(v, _Factory):
                        v = v.make()
                else:
                    raise TypeError(f"{qual}.__init__() missing 1 required positional argument: '{n}'")
                set_field(self, n, v)
            post = getattr(self, "__post_init__", None)
            if post is not None:
                post()

        cls.__init__ = __init__
        cls._FIELDS = names
        base = Frozen if frozen else Plain
        cls._values = Plain._values
        cls.__eq__ = Plain.__eq__
        cls.__repr__ = Plain.__repr__
        if frozen:
            cls.__setattr__ = base.__setattr__
            cls.__delattr__ = base.__delattr__
            cls.__hash__ = base.__hash__
            cls.__reduce__ = base.__reduce__
        else:
            cls.__hash__ = None
        return cls
    return wrap if cls is None else wrap(cls)
