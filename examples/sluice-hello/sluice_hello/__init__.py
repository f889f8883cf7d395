"""sluice-hello: the smallest whole sluice plugin.

It adds a BPF program (packets per IP protocol on one interface), a pinned map, a CLI command
(`sluice hello`) and a Prometheus metric (`sluice_hello_packets_total`).
"""

from __future__ import annotations

import ctypes as ct
from pathlib import Path

import click
import pydantic
from prometheus_client.core import CounterMetricFamily

from sluice import hookimpl
from sluice.bpf.maps import Map
from sluice.programs import TC, Program

__version__ = "0.1.0"
HERE = Path(__file__).parent
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6"}


class Config(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    interface: str = "eth0"


@hookimpl
def sluice_config_schema():
    return Config


@hookimpl
def sluice_requirements():
    return ["tc"]


@hookimpl
def sluice_programs(ctx):
    return [
        Program(
            "hello",
            HERE / "hello.bpf.c",
            [TC(ctx.config.interface, "ingress", "hello_ingress", "observe", 50)],
        )
    ]


def read_counts(pin: Path) -> dict[str, int]:
    """Packets per protocol from the pinned map: works while the agent is down."""
    with Map.open_pinned(pin, key_type=ct.c_uint8, value_type=ct.c_uint64) as m:
        return {PROTOCOLS.get(proto, str(proto)): sum(per_cpu) for proto, per_cpu in m.items()}


class PacketsCollector:
    def __init__(self, pin: Path):
        self.pin = pin

    def collect(self):
        family = CounterMetricFamily("sluice_hello_packets", "Packets seen per IP protocol", labels=["proto"])
        if self.pin.exists():
            for proto, count in read_counts(self.pin).items():
                family.add_metric([proto], count)
        yield family


@hookimpl
def sluice_metrics(ctx):
    return [PacketsCollector(ctx.pin_dir / "hello_packets")]


@click.command("hello")
@click.option("--bpffs", type=click.Path(path_type=Path), default="/sys/fs/bpf", show_default=True)
def hello_command(bpffs: Path):
    """Packets per IP protocol seen by the hello plugin."""
    pin = bpffs / "sluice" / "hello" / "hello_packets"
    if not pin.exists():
        raise click.ClickException(f"{pin} not found: enable the hello plugin and run the agent")
    for proto, count in sorted(read_counts(pin).items()):
        click.echo(f"{proto:<6} {count}")


@hookimpl
def sluice_cli_commands():
    return [hello_command]
