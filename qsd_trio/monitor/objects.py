"""QMP commands: object-add, object-del, qom-*."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..objects import secret, throttle_group, tls_creds
from ..objects.qom import USER_CREATABLE, UserObject, check_id, object_properties, resolve
from ..qapi import schema
from ..qapi.errors import DeviceNotFound, GenericError
from .registry import command

if TYPE_CHECKING:
    from ..daemon import Daemon

@command("object-add")
async def object_add(daemon: Daemon, args: Any) -> None:
    props = schema.to_qmp(args)
    qom_type = props.pop("qom-type")
    id = props.pop("id")
    await add_object(daemon, qom_type, id, props)


async def add_object(daemon: Daemon, qom_type: str, id: str, props: dict[str, Any]) -> None:
    check_id(id)
    if id in daemon.objects:
        raise GenericError(
            f"attempt to add duplicate property '{id}' to object (type 'container')")
    if qom_type not in USER_CREATABLE:
        raise GenericError(f"object type '{qom_type}' isn't supported by object-add")
    obj: UserObject
    if qom_type == "throttle-group":
        # a live limiter shared by throttle nodes, not just properties
        obj = throttle_group.create(daemon.graph, id, props)
    elif qom_type == "secret":
        # loaded now (data, file, base64, keyid), as QEMU loads it
        obj = secret.create(daemon.graph, id, props)
    else:
        if qom_type.startswith("tls-creds"):
            tls_creds.check(qom_type, props)
        obj = UserObject(id, qom_type, props)
    daemon.objects[id] = obj
    daemon.objects_root = True


@command("object-del")
async def object_del(daemon: Daemon, args: Any) -> None:
    if args.id not in daemon.objects:
        raise GenericError(f"object '{args.id}' not found")
    if daemon.object_users(args.id):
        raise GenericError(f"object '{args.id}' is in use, can not be deleted")
    obj: UserObject = daemon.objects.pop(args.id)
    obj.on_delete()


@command("qom-list-types")
async def qom_list_types(daemon: Daemon, args: Any) -> list[dict[str, str]]:
    implements = args.implements if args else None
    abstract = bool(args.abstract) if args and args.abstract is not None else False
    types = dict(USER_CREATABLE)
    if implements not in (None, "user-creatable"):
        types = {k: v for k, v in types.items() if implements in (k, v)}
    del abstract  # none of the user-creatable types is abstract
    return [{"name": k, "parent": v} for k, v in types.items()]


@command("qom-list")
async def qom_list(daemon: Daemon, args: Any) -> list[dict[str, str]]:
    kind, thing = resolve(daemon, args.path)
    out = [{"name": "type", "type": "string"}]
    if kind == "root":
        out.append({"name": "chardevs", "type": "child<container>"})
        if daemon.objects_root:
            out.append({"name": "objects", "type": "child<container>"})
    elif kind == "container" and thing == "objects":
        out += [{"name": i, "type": f"child<{o.qom_type}>"} for i, o in daemon.objects.items()]
    elif kind == "container":
        out += [{"name": i, "type": f"child<chardev-{c.backend}>"}
                for i, c in daemon.chardevs.items()]
    elif kind == "object":
        out = [{"name": n, "type": t} for n, t in object_properties(thing.qom_type)]
    return out


@command("qom-get")
async def qom_get(daemon: Daemon, args: Any) -> Any:
    kind, thing = resolve(daemon, args.path)
    if kind == "object":
        return thing.get(args.property)
    if args.property == "type":
        return {"root": "container", "container": "container",
                "chardev": f"chardev-{thing.backend}"}[kind]
    tname = "container" if kind in ("root", "container") else f"chardev-{thing.backend}"
    raise GenericError(f"Property '{tname}.{args.property}' not found")


@command("qom-set")
async def qom_set(daemon: Daemon, args: Any) -> None:
    kind, thing = resolve(daemon, args.path)
    if kind != "object":
        tname = "container" if kind in ("root", "container") else f"chardev-{thing.backend}"
        raise GenericError(f"Property '{tname}.{args.property}' not found")
    thing.qom_set(args.property, args.value)


@command("qom-list-properties")
async def qom_list_properties(daemon: Daemon, args: Any) -> list[dict[str, str]]:
    if args.typename not in USER_CREATABLE:
        raise DeviceNotFound(f"Class '{args.typename}' not found")
    return [{"name": n, "type": t} for n, t in object_properties(args.typename)]
