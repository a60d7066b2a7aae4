"""Microsoft.Network: virtual networks and subnets, network security groups, public IPs, NICs.

Addresses are loopback addresses (127.x.y.z), one per public IP and per NIC IP configuration, so
whatever a client reads from `ipAddress` or `privateIPAddress` leads to the VM's real sshd on port 22.
ARM's in-use rules are kept: a NIC attached to a VM, or a public IP, subnet or NSG used by a NIC,
cannot be deleted, so a cleanup that deletes in the wrong order fails here as it does on Azure.
"""

from __future__ import annotations

import copy
import ipaddress

from .core import ArmError, Resource, ResourceType, new_guid
from .vmhost import allocate_address

DEFAULT_SECURITY_RULES = [  # what ARM adds to every NSG
    ("AllowVnetInBound", 65000, "Inbound", "Allow", "VirtualNetwork", "VirtualNetwork"),
    ("AllowAzureLoadBalancerInBound", 65001, "Inbound", "Allow", "AzureLoadBalancer", "*"),
    ("DenyAllInBound", 65500, "Inbound", "Deny", "*", "*"),
    ("AllowVnetOutBound", 65000, "Outbound", "Allow", "VirtualNetwork", "VirtualNetwork"),
    ("AllowInternetOutBound", 65001, "Outbound", "Allow", "*", "Internet"),
    ("DenyAllOutBound", 65500, "Outbound", "Deny", "*", "*"),
]


def ref(obj: dict | None, *path: str) -> str | None:
    """obj[path...]["id"], or None."""
    for key in path:
        obj = (obj or {}).get(key)
    return (obj or {}).get("id") if isinstance(obj, dict) else None


def same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.lower() == b.lower()


def ip_configurations(nic: Resource) -> list[dict]:
    return nic.properties.get("ipConfigurations") or []


def ssh_allowed(double, nic: Resource, config: dict, from_internet: bool) -> bool:
    """Whether the NSGs of a NIC and of its subnet let SSH (TCP 22) in from this host to one of the NIC's
    IP configurations: through its public IP (`from_internet`) or its private IP (from inside the VNet).
    As on Azure, no NSG lets everything in, and each NSG's first matching rule by priority decides."""
    subnet = double.find(ref(config.get("properties"), "subnet"))
    nsgs = [double.find(ref(nic.properties, "networkSecurityGroup")),
            double.find(ref(subnet.properties, "networkSecurityGroup")) if subnet else None]
    return all(_nsg_allows_ssh(double, nsg, from_internet) for nsg in nsgs if nsg is not None)


def _nsg_allows_ssh(double, nsg: Resource, from_internet: bool) -> bool:
    rules = [r.properties for r in double.find_all(SecurityRule.type) if r.id.lower().startswith(nsg.id.lower() + "/")]
    rules += [{"priority": priority, "direction": direction, "access": access, "protocol": "*",
               "sourceAddressPrefix": source, "destinationPortRange": "*"}
              for _, priority, direction, access, source, _ in DEFAULT_SECURITY_RULES]
    for rule in sorted(rules, key=lambda r: int(r["priority"])):
        if (rule.get("direction") == "Inbound" and rule.get("protocol") in ("Tcp", "*")
                and _port_matches(rule) and _source_matches(rule, from_internet)):
            return rule.get("access") == "Allow"
    return False


def _port_matches(rule: dict) -> bool:
    for ports in [rule.get("destinationPortRange")] + (rule.get("destinationPortRanges") or []):
        low, _, high = str(ports or "").partition("-")
        if ports == "*" or (low.isdigit() and int(low) <= 22 <= int(high or low)):
            return True
    return False


def _source_matches(rule: dict, from_internet: bool) -> bool:
    """This host's connections come from 127.0.0.1: over the Internet to a public IP, from inside the
    VNet to a private one."""
    for prefix in [rule.get("sourceAddressPrefix")] + (rule.get("sourceAddressPrefixes") or []):
        if prefix == "*" or prefix == ("Internet" if from_internet else "VirtualNetwork"):
            return True
        try:
            if ipaddress.ip_address("127.0.0.1") in ipaddress.ip_network(prefix or "", strict=False):
                return True
        except ValueError:  # another service tag
            pass
    return False


class _Network(ResourceType):
    creating_state = "Updating"

    def check_set(self, parent: Resource, siblings: list[dict]) -> None:
        """Refuse a set of children that cannot live together (their properties, each with its name)."""

    def validate(self, res: Resource, existing: Resource | None, group: Resource, inline: bool = False) -> None:
        res.doc["etag"] = f'W/"{new_guid()}"'
        if self.tracked:
            res.properties["resourceGuid"] = existing.properties["resourceGuid"] if existing else new_guid()

    def require(self, referrer: Resource, resource_id: str | None, type_: str) -> Resource:
        target = self.double.find(resource_id)
        if target is None or target.type.lower() != type_.lower():
            raise ArmError(400, "InvalidResourceReference",
                           f"Resource {resource_id} referenced by resource {referrer.id} was not found. Please make "
                           "sure that the referenced resource exists, and that both resources are in the same region.")
        return target


class _WithChildren(_Network):
    """A parent whose children can also be given inline (a vnet's subnets, an NSG's rules): ARM
    creates them as child resources and renders them back inline; a PUT replaces the whole set."""

    children = ""  # property name
    child_type: type[ResourceType]

    def validate(self, res, existing, group, inline=False):
        super().validate(res, existing, group, inline)
        inline = res.properties.pop(self.children, None) or []
        child = self.double.handler(self.child_type.type)
        child.check_set(res, [{**(item.get("properties") or {}), "name": item.get("name")} for item in inline])
        kept = set()
        for item in inline:
            child_id = f"{res.id}/{self.child_type.type.split('/')[-1]}/{item['name']}"
            kept.add(child_id.lower())
            doc = {"id": child_id, "name": item["name"], "type": child.type,
                   "properties": copy.deepcopy(item.get("properties") or {})}
            sub = Resource(child_id, child.type, doc)
            child.validate(sub, self.double.find(child_id), group, inline=True)
            sub.properties["provisioningState"] = "Succeeded"
            self.double.add(sub)
        for old in self._children(res):
            if old.id.lower() not in kept:
                child.check_delete(old)
                self.double.remove(old)

    def _children(self, res: Resource) -> list[Resource]:
        return [r for r in self.double.find_all(self.child_type.type) if r.id.lower().startswith(res.id.lower() + "/")]

    def view(self, res, query):
        doc = super().view(res, query)
        child = self.double.handler(self.child_type.type)
        doc["properties"][self.children] = [child.view(c, query) for c in self._children(res)]
        return doc


class Subnet(_Network):
    type = "Microsoft.Network/virtualNetworks/subnets"
    tracked = False

    def validate(self, res, existing, group, inline=False):
        super().validate(res, existing, group, inline)
        if not (res.properties.get("addressPrefix") or res.properties.get("addressPrefixes")):
            raise ArmError(400, "InvalidRequestFormat", f"Cannot parse the request: subnet {res.name} has no "
                           "addressPrefix.")
        if nsg := ref(res.properties, "networkSecurityGroup"):
            self.require(res, nsg, NetworkSecurityGroup.type)

    def users(self, res: Resource) -> list[str]:
        return [c["id"] for nic in self.double.find_all(NetworkInterface.type) for c in ip_configurations(nic)
                if same(ref(c.get("properties"), "subnet"), res.id)]

    def view(self, res, query):
        doc = super().view(res, query)
        if users := self.users(res):
            doc["properties"]["ipConfigurations"] = [{"id": i} for i in users]
        return doc

    def check_delete(self, res):
        if users := self.users(res):
            raise ArmError(400, "InUseSubnetCannotBeDeleted",
                           f"Subnet {res.name} is in use by {users[0]} and cannot be deleted. In order to delete the "
                           "subnet, delete all the resources within the subnet. See aka.ms/deletesubnet.")


class VirtualNetwork(_WithChildren):
    type = "Microsoft.Network/virtualNetworks"
    children, child_type = "subnets", Subnet

    def validate(self, res, existing, group, inline=False):
        if not (res.properties.get("addressSpace") or {}).get("addressPrefixes"):
            raise ArmError(400, "InvalidAddressSpace", f"Virtual network {res.name} must have an address space.")
        super().validate(res, existing, group, inline)

    def check_delete(self, res):
        for subnet in self._children(res):
            self.double.handler(Subnet.type).check_delete(subnet)


class SecurityRule(_Network):
    type = "Microsoft.Network/networkSecurityGroups/securityRules"
    tracked = False

    def validate(self, res, existing, group, inline=False):
        super().validate(res, existing, group, inline)
        p = res.properties
        for field in ("protocol", "access", "direction", "priority"):
            if p.get(field) in (None, ""):
                raise ArmError(400, "SecurityRuleParameterContainsNullOrEmpty" if field != "priority" else
                               "SecurityRuleInvalidPriority",
                               f"Security rule {res.name} has no {field}.")
        if not 100 <= int(p["priority"]) <= 4096:
            raise ArmError(400, "SecurityRuleInvalidPriority", f"Security rule {res.name} has invalid priority "
                           f"{p['priority']}. Value provided: {p['priority']} Allowed range 100-4096.")
        if not inline:  # a rule PUT on its own joins the NSG's other rules
            nsg_id = res.id.rsplit("/", 2)[0].lower()
            others = [o.properties | {"name": o.name} for o in self.double.find_all(self.type)
                      if o.id.lower().startswith(nsg_id + "/") and o.id.lower() != res.id.lower()]
            self.check_set(None, others + [p | {"name": res.name}])

    def check_set(self, parent, siblings):
        seen = {}
        for rule in siblings:
            key = (str(rule.get("priority")), str(rule.get("direction")).lower())
            if key in seen:
                raise ArmError(400, "SecurityRuleConflict", f"Security rule {rule['name']} conflicts with rule "
                               f"{seen[key]}. Rules cannot have the same Priority and Direction. To learn more, "
                               "see aka.ms/nsgrules.")
            seen[key] = rule["name"]


class NetworkSecurityGroup(_WithChildren):
    type = "Microsoft.Network/networkSecurityGroups"
    children, child_type = "securityRules", SecurityRule

    def view(self, res, query):
        doc = super().view(res, query)
        doc["properties"]["defaultSecurityRules"] = [{
            "id": f"{res.id}/defaultSecurityRules/{name}", "name": name,
            "type": "Microsoft.Network/networkSecurityGroups/defaultSecurityRules",
            "properties": {"priority": priority, "direction": direction, "access": access, "protocol": "*",
                           "sourceAddressPrefix": source, "destinationAddressPrefix": destination,
                           "sourcePortRange": "*", "destinationPortRange": "*", "provisioningState": "Succeeded"}}
            for name, priority, direction, access, source, destination in DEFAULT_SECURITY_RULES]
        nics, subnets = self.users(res)
        if nics:
            doc["properties"]["networkInterfaces"] = [{"id": i} for i in nics]
        if subnets:
            doc["properties"]["subnets"] = [{"id": i} for i in subnets]
        return doc

    def users(self, res: Resource) -> tuple[list[str], list[str]]:
        nics = [n.id for n in self.double.find_all(NetworkInterface.type)
                if same(ref(n.properties, "networkSecurityGroup"), res.id)]
        subnets = [s.id for s in self.double.find_all(Subnet.type)
                   if same(ref(s.properties, "networkSecurityGroup"), res.id)]
        return nics, subnets

    def check_delete(self, res):
        nics, subnets = self.users(res)
        if nics or subnets:
            raise ArmError(400, "InUseNetworkSecurityGroupCannotBeDeleted",
                           f"Network security group {res.id} cannot be deleted because it is in use by the following "
                           f"resources: {', '.join(nics + subnets)}. In order to delete the Network security group, "
                           "remove the association with the resource(s).")


class PublicIPAddress(_Network):
    type = "Microsoft.Network/publicIPAddresses"

    def validate(self, res, existing, group, inline=False):
        super().validate(res, existing, group, inline)
        res.doc.setdefault("sku", {"name": "Standard", "tier": "Regional"})
        p = res.properties
        p.setdefault("publicIPAllocationMethod", "Static" if res.doc["sku"]["name"] == "Standard" else "Dynamic")
        if res.doc["sku"]["name"] == "Standard" and p["publicIPAllocationMethod"] != "Static":
            raise ArmError(400, "InvalidRequestFormat",
                           f"Standard sku publicIp {res.id} must have AllocationMethod set to Static.")
        p.setdefault("publicIPAddressVersion", "IPv4")
        p.setdefault("idleTimeoutInMinutes", 4)
        p["ipAddress"] = existing.properties["ipAddress"] if existing else allocate_address(self.double.addresses)

    def user(self, res: Resource) -> str | None:
        return next((c["id"] for nic in self.double.find_all(NetworkInterface.type) for c in ip_configurations(nic)
                     if same(ref(c.get("properties"), "publicIPAddress"), res.id)), None)

    def view(self, res, query):
        doc = super().view(res, query)
        if user := self.user(res):
            doc["properties"]["ipConfiguration"] = {"id": user}
        return doc

    def check_delete(self, res):
        if user := self.user(res):
            raise ArmError(400, "PublicIPAddressCannotBeDeleted",
                           f"Public IP address {res.id} can not be deleted since it is still allocated to resource "
                           f"{user}. In order to delete the public IP, disassociate/detach the Public IP address from "
                           "the resource. To learn how to do this, see aka.ms/deletepublicip.")

    def delete(self, res):
        self.double.addresses.discard(res.properties.get("ipAddress"))


class NetworkInterface(_Network):
    type = "Microsoft.Network/networkInterfaces"

    def validate(self, res, existing, group, inline=False):
        super().validate(res, existing, group, inline)
        configs = res.properties.get("ipConfigurations") or []
        if not configs:
            raise ArmError(400, "NetworkInterfaceMustHaveAtLeastOneIpConfiguration",
                           f"Network interface {res.id} must have one or more IP configurations.")
        if nsg := ref(res.properties, "networkSecurityGroup"):
            self.require(res, nsg, NetworkSecurityGroup.type)
        old = {c["name"]: c for c in ip_configurations(existing)} if existing else {}
        for index, config in enumerate(configs):
            p = config.setdefault("properties", {})
            subnet = self.require(res, ref(p, "subnet"), Subnet.type)
            vnet = self.double.find(subnet.id.rsplit("/", 2)[0])
            if vnet.doc["location"] != res.doc["location"]:
                raise ArmError(400, "InvalidResourceReference",
                               f"Resource {subnet.id} referenced by resource {res.id} was not found. Please make sure "
                               "that the referenced resource exists, and that both resources are in the same region.")
            if pip := ref(p, "publicIPAddress"):
                self.require(res, pip, PublicIPAddress.type)
                user = self.double.handler(PublicIPAddress.type).user(self.double.find(pip))
                if user and not user.lower().startswith(res.id.lower() + "/"):
                    raise ArmError(400, "PublicIPAddressInUse", f"Resource {pip} is referenced by resource "
                                   f"{user}, and cannot be referenced by {res.id}.")
            config["id"] = f"{res.id}/ipConfigurations/{config['name']}"
            config["type"] = "Microsoft.Network/networkInterfaces/ipConfigurations"
            p.setdefault("primary", index == 0)
            p["privateIPAllocationMethod"] = p.get("privateIPAllocationMethod") or "Dynamic"
            p["privateIPAddressVersion"] = "IPv4"
            p["privateIPAddress"] = ((old.get(config["name"]) or {}).get("properties", {}).get("privateIPAddress")
                                     or allocate_address(self.double.addresses))
            p["provisioningState"] = "Succeeded"
        for name, config in old.items():
            if name not in {c["name"] for c in configs}:
                self.double.addresses.discard(config["properties"]["privateIPAddress"])

    def user(self, res: Resource) -> str | None:
        return next((vm.id for vm in self.double.find_all("Microsoft.Compute/virtualMachines")
                     for n in (vm.properties.get("networkProfile") or {}).get("networkInterfaces") or []
                     if same(n.get("id"), res.id)), None)

    def view(self, res, query):
        doc = super().view(res, query)
        if vm := self.user(res):
            doc["properties"]["virtualMachine"] = {"id": vm}
            doc["properties"]["macAddress"] = "00-0D-3A-" + "-".join(res.properties["resourceGuid"][i:i + 2].upper()
                                                                     for i in (0, 2, 4))
        return doc

    def check_delete(self, res):
        if vm := self.user(res):
            raise ArmError(400, "NicInUse", f"Network Interface {res.id} is used by existing resource {vm}. In order "
                           "to delete the network interface, it must be dissociated from the resource. To learn more, "
                           "see aka.ms/deletenic.")

    def delete(self, res):
        for config in ip_configurations(res):
            self.double.addresses.discard(config["properties"].get("privateIPAddress"))


TYPES = [VirtualNetwork, Subnet, NetworkSecurityGroup, SecurityRule, PublicIPAddress, NetworkInterface]
