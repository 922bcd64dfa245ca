"""Drives a Redfish BMC with sushy, the client library Ironic uses on real BMCs.

Run by test/lab/redfish-sushy.test.ts with Debian's /usr/bin/python3 (package
python3-sushy). Prints one JSON object per step on stdout ("step" names it);
the test checks each against the machine behind the BMC. Exits non-zero on
the first step sushy refuses.

    redfish_sushy.py BMC_URL USER PASSWORD SYSTEM_NAME ISO_URL
"""

import json
import sys
import time

import requests
import sushy
from sushy import exceptions


def emit(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


def wait_power(system, wanted, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        system.refresh()
        if system.power_state == wanted:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"power state {system.power_state} is not {wanted} after {timeout} s")
        time.sleep(0.1)


def main():
    url, user, password, name, iso_url = sys.argv[1:6]

    # The service root answers without credentials; anything else wants them.
    root = requests.get(f"{url}/redfish/v1/", timeout=10)
    denied = requests.get(f"{url}/redfish/v1/Systems", timeout=10)
    emit(
        "unauthenticated",
        root=root.status_code,
        systems=denied.status_code,
        www_authenticate=denied.headers.get("WWW-Authenticate", ""),
        error_code=denied.json().get("error", {}).get("code", ""),
    )

    auth = sushy.auth.SessionOrBasicAuth(username=user, password=password)
    conn = sushy.Sushy(url, auth=auth, verify=False)
    emit("session", token=bool(auth.get_session_key()), session_uri=auth.get_session_resource_id() or "")

    members = conn.get_system_collection().get_members()
    system = members[0]
    # By name: the BMC redirects (307) to the UUID's path.
    by_name = conn.get_system(f"/redfish/v1/Systems/{name}")
    emit(
        "system",
        count=len(members),
        identity=system.identity,
        by_name_identity=by_name.identity,
        power=system.power_state.value,
        reset_types=sorted(v.value for v in system.get_allowed_reset_system_values()),
        boot_targets=sorted(v.value for v in system.get_allowed_system_boot_source_values()),
    )

    system.set_system_boot_options(
        target=sushy.BootSource.PXE,
        enabled=sushy.BootSourceOverrideEnabled.CONTINUOUS,
        mode=sushy.BootSourceOverrideMode.UEFI,
    )
    system.refresh()
    emit("boot_pxe", target=system.boot.target.value, enabled=system.boot.enabled.value, mode=system.boot.mode.value)

    system.reset_system(sushy.ResetType.ON)
    wait_power(system, sushy.PowerState.ON)
    emit("power_on", power=system.power_state.value)

    manager = system.managers[0]
    drive = None
    for member in manager.virtual_media.get_members():
        if any(t.value in ("CD", "DVD") for t in member.media_types):
            drive = member
    drive.insert_media(iso_url, inserted=True, write_protected=True)
    drive.refresh()
    emit("insert", inserted=drive.inserted, image=drive.image, path=drive.path)

    system.set_system_boot_options(target=sushy.BootSource.CD, enabled=sushy.BootSourceOverrideEnabled.ONCE)
    system.refresh()
    emit("boot_cd", target=system.boot.target.value, enabled=system.boot.enabled.value)

    system.reset_system(sushy.ResetType.FORCE_RESTART)
    time.sleep(0.5)
    system.refresh()
    emit("restart", power=system.power_state.value)

    drive.eject_media()
    drive.refresh()
    emit("eject", inserted=drive.inserted, image=drive.image or "")

    # A target the machine lacks: the BMC's 400 carries error.message and @Message.ExtendedInfo.
    try:
        conn._conn.patch(system.path, data={"Boot": {"BootSourceOverrideTarget": "Floppy"}})
        emit("bad_target", status=200)
    except exceptions.BadRequestError as error:
        emit("bad_target", status=error.status_code, code=error.code, detail=error.detail or "")

    system.reset_system(sushy.ResetType.FORCE_OFF)
    wait_power(system, sushy.PowerState.OFF)
    emit("power_off", power=system.power_state.value)

    auth.close()
    emit("logout", sessions_left=len(requests.get(f"{url}/redfish/v1/SessionService/Sessions", auth=(user, password), timeout=10).json()["Members"]))


if __name__ == "__main__":
    main()
