#!/usr/bin/env bash
# Spread a NIC's interrupt lines and its RPS/XPS queues over the CPUs ferrule runs on, so that
# a connection's packets are handled on the core whose shard accepts it (ferrule sets
# SO_INCOMING_CPU on each per-core listener; that only helps when IRQs land on those CPUs).
#
#   tuning/irq-affinity.sh IFACE CPULIST            # dry run: prints what it would write
#   tuning/irq-affinity.sh IFACE CPULIST --apply    # writes it (root)
#
# CPULIST is the list ferrule was given (`--cores 0-7` or the node's CPUs for `--cores numa:N`,
# see /sys/devices/system/node/nodeN/cpulist), e.g. 0-3,8-11. Queue i of the NIC goes to the
# i-th CPU of the list (round robin). Stop irqbalance first, or it will undo this:
#   systemctl disable --now irqbalance
set -euo pipefail

usage() { echo "usage: $0 IFACE CPULIST [--apply]" >&2; exit 2; }
[[ $# -ge 2 && $# -le 3 ]] || usage
iface=$1; cpulist=$2; apply=0
[[ ${3:-} == "" || ${3:-} == --apply ]] || usage
[[ ${3:-} == --apply ]] && apply=1
[[ $iface =~ ^[A-Za-z0-9_.:-]+$ ]] || { echo "bad interface name: $iface" >&2; exit 2; }
[[ -d /sys/class/net/$iface ]] || { echo "no such interface: $iface" >&2; exit 1; }

# expand "0-3,8" -> 0 1 2 3 8
cpus=()
IFS=, read -r -a parts <<<"$cpulist"
for p in "${parts[@]}"; do
    if [[ $p =~ ^([0-9]+)-([0-9]+)$ ]]; then
        for ((c = BASH_REMATCH[1]; c <= BASH_REMATCH[2]; c++)); do cpus+=("$c"); done
    elif [[ $p =~ ^[0-9]+$ ]]; then cpus+=("$p")
    else echo "bad CPU list: $cpulist" >&2; exit 2; fi
done
((${#cpus[@]})) || usage
ncpu=$(nproc --all)
for c in "${cpus[@]}"; do ((c < ncpu)) || { echo "CPU $c does not exist" >&2; exit 1; }; done

# hex mask for one CPU or a set (comma-grouped in 32-bit words, as /proc and /sys expect)
mask_of() {
    local -a words=() ; local c w i out=""
    for c in "$@"; do w=$((c / 32)); words[w]=$(( ${words[w]:-0} | (1 << (c % 32)) )); done
    for ((i = (ncpu - 1) / 32; i >= 0; i--)); do
        out+=$(printf '%08x' "${words[i]:-0}"); ((i)) && out+=,
    done
    echo "$out"
}

write() {  # FILE VALUE
    if ((apply)); then echo "$2" > "$1" && echo "wrote $2 > $1"
    else echo "would write $2 > $1"; fi
}

# 1. hardware interrupt lines of the NIC (MSI-X vectors), round robin over the CPUs
irqs=()
if [[ -d /sys/class/net/$iface/device/msi_irqs ]]; then
    for f in /sys/class/net/"$iface"/device/msi_irqs/*; do irqs+=("$(basename "$f")"); done
fi
if ((${#irqs[@]} == 0)); then
    # virtual NICs without msi_irqs: fall back to /proc/interrupts lines naming the interface
    while read -r irq; do irqs+=("${irq%:}"); done < <(awk -v i="$iface" '$NF ~ i {print $1}' /proc/interrupts)
fi
((${#irqs[@]})) || echo "note: no IRQ lines found for $iface (virtual or software interface)"
i=0
for irq in "${irqs[@]}"; do
    [[ -e /proc/irq/$irq/smp_affinity_list ]] || continue
    write "/proc/irq/$irq/smp_affinity_list" "${cpus[i % ${#cpus[@]}]}"
    i=$((i + 1))
done

# 2. RPS: every receive queue may steer packets to any of ferrule's CPUs (helps NICs with
#    fewer queues than CPUs); XPS: transmit queue j is used by CPU j of the list.
all=$(mask_of "${cpus[@]}")
for q in /sys/class/net/"$iface"/queues/rx-*; do
    [[ -e $q/rps_cpus ]] && write "$q/rps_cpus" "$all"
done
j=0
for q in /sys/class/net/"$iface"/queues/tx-*; do
    [[ -e $q/xps_cpus ]] || continue
    write "$q/xps_cpus" "$(mask_of "${cpus[j % ${#cpus[@]}]}")"
    j=$((j + 1))
done
((apply)) || echo "(dry run; add --apply to write)"
