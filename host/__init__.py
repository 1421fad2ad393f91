"""Facts about a host that both the compiler (its checks against this machine) and the runtime
(attaching on it) need: ELF files and their symbols and USDT notes (`elf`), tracefs and the
tracepoint formats (`tracefs`), kernel BTF strings (`btf`), and what the kernel can trace,
as `probec doctor` reports it (`features`).

A leaf: nothing here imports anything else of probec (tests/test_layering.py checks it)."""
