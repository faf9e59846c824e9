"""The command line (``controlcanvas``): the parser and commands (main), preprocess and pose
commands (preprocess), the demo, doctor and plug-in install."""
