"""MobileMoE phone engine: .mmoe format + exporter (mobile.format, mobile.export), C runtime (mobile/c),
ctypes binding (mobile.Engine). The runtime side never imports torch."""

from mobile.engine import Engine, Generation  # noqa: F401
