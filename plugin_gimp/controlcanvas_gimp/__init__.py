"""ControlCanvas for GIMP 3: the Filters ▸ ControlNet plug-in.

Layout (one job per module; only ``canvas`` imports GIMP):

- ``procedures`` every procedure, its menu label and its arguments, as plain data;
- ``settings``   where the server is and which token to use;
- ``generation`` dialog values → a :class:`shared.messages.GenerateRequest`;
- ``pose``       the skeleton as a GIMP path (the rest of the skeleton is ``shared.pose``);
- ``worker``     network I/O on a worker thread, events handed to the main thread;
- ``actions``    what each procedure does, written against the ``host.Host`` interface;
- ``problems``   the plug-in's own errors, and every error as a sentence for the user;
- ``canvas``     the GIMP adapter: registration, dialogs, layers, paths, progress.

Everything except ``canvas`` runs on Python >= 3.10 with the standard library and
the bundled ``shared`` and ``websockets`` packages, so it is tested without GIMP.
"""

__version__ = "0.1.0"
