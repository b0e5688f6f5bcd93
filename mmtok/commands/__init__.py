"""Sub-commands of the ``mmtok`` CLI: each module defines ``add_parser(subparsers)``.

``add_parser`` registers a parser and sets ``run=`` (a function of the parsed args returning an exit
code) with ``set_defaults``. Modules here are discovered by name, so a new command is a new file.
"""
