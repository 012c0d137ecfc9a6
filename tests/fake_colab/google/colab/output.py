calls = []


def serve_kernel_port_as_iframe(port, path="/", height=800, cache_in_notebook=False):
    calls.append(("iframe", port, path))


def serve_kernel_port_as_window(port, path="/", anchor_text=None):
    calls.append(("window", port, path))


def clear(wait=False, output_tags=()):
    calls.append(("clear",))


def enable_custom_widget_manager():
    calls.append(("widgets",))
