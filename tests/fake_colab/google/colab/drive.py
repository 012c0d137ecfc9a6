import os

mounted = []


def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
    os.makedirs(os.path.join(mountpoint, "MyDrive"), exist_ok=True)
    mounted.append(mountpoint)
    print(f"Mounted at {mountpoint}")


def flush_and_unmount(timeout_ms=None):
    mounted.clear()
