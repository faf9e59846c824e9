"""The websocket server: auth and limits around ``shared.session`` (websocket), the job
queue with one engine thread (jobs), configuration (config), an in-process server (local)."""
