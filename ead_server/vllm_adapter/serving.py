"""``ead-server serve``: vLLM's own ``vllm serve``, with our routes as an endpoint plugin.

Nothing of vLLM's start-up is copied here. ``ead-server serve`` parses vLLM's flags plus
ours, enables the ``ead_server`` endpoint plugin (``vllm.endpoint_plugins``) and hands
over to vLLM's ``serve`` command, so every start-up step of the pinned vLLM runs (data
parallel API servers, plugin imports, the SIGTERM handler during start-up, ...). vLLM
calls the plugin to attach our routes and middleware (:func:`ead_server.server.attach`)
and, once the engine exists, to build their state (:func:`ead_server.server.init_state`).

Stock vLLM serves the same routes with the plugin allowlisted::

    VLLM_PLUGINS=ead_server EAD_ADMIN_KEY=... EAD_WEIGHTS_ROOT=/ckpt \\
        python -m vllm.entrypoints.openai.api_server --model M --logprobs-mode processed_logprobs

(``VLLM_PLUGINS`` is also an allowlist for vLLM's other plugin groups: name those you
use too.)
"""

from __future__ import annotations

import argparse
import os
from importlib.metadata import entry_points
from typing import Any

__all__ = ["PLUGIN_NAME", "EADEndpointPlugin", "add_engine_arguments", "argument_parser_class", "serve"]

PLUGIN_NAME = "ead_server"
"""Our name in the ``vllm.endpoint_plugins`` entry-point group and in ``VLLM_PLUGINS``."""


class EADEndpointPlugin:
    """The ``vllm.endpoint_plugins`` entry point: vLLM's ``EndpointPlugin`` protocol."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        from ead_server.server import attach
        from ead_server.vllm_adapter.seeds import install_independent_seeds

        install_independent_seeds()  # in every API server process: the n > 1 fan-out is here
        attach(app)

    async def init_state(self, engine_client: Any, state: Any, args: argparse.Namespace) -> None:
        from ead_server.server import init_state

        await init_state(engine_client, state, args)


def add_engine_arguments(parser: Any) -> Any:
    """Add every ``vllm serve`` flag to ``parser`` (a ``FlexibleArgumentParser``)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser

    return make_arg_parser(parser)


def argument_parser_class() -> type:
    """vLLM's ``FlexibleArgumentParser``: the parser class its flags are written for."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return FlexibleArgumentParser


def _enable_plugin() -> None:
    """Allowlist our endpoint plugin in ``VLLM_PLUGINS`` without disabling any other.

    Unset, ``VLLM_PLUGINS`` loads every installed plugin except endpoint plugins, which
    must be named; setting it to our name alone would switch the others off. So an
    unset allowlist becomes "every installed vLLM plugin, and ours", and a set one gains
    ours. Child processes (API servers, engine) inherit it.
    """
    current = os.environ.get("VLLM_PLUGINS")
    if current is None:
        names = {ep.name for group in entry_points().groups if group.startswith("vllm.")
                 for ep in entry_points(group=group) if group != "vllm.endpoint_plugins"}
    else:
        names = set(current.split(","))
    os.environ["VLLM_PLUGINS"] = ",".join(sorted(names | {PLUGIN_NAME}))


def _admit_admin_key(args: argparse.Namespace) -> None:
    """With both ``--api-key`` (or ``$VLLM_API_KEY``) and ``--admin-key``, make the admin
    key one of the API keys.

    Why: vLLM's own auth middleware sits in front of every ``/v1`` route and knows only the
    API keys, so ``POST /v1/weights/reload`` with the admin key alone would be refused
    there before our admin check ran; a trainer should send one key, not two. The admin
    key therefore opens every route, as an administrator's key does.
    """
    from ead_server.guard import api_keys_from_args

    admin = getattr(args, "admin_key", None)
    keys = api_keys_from_args(args)
    if admin and keys and admin not in keys:
        args.api_key = [*keys, admin]


def serve(args: argparse.Namespace) -> None:
    """Run vLLM's ``serve`` command with our plugin enabled, in this process."""
    _enable_plugin()
    _admit_admin_key(args)
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    ServeSubcommand.cmd(args)
