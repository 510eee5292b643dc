#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# The guest side of ci/e2e-secureboot.sh: runs inside a VM booted by UEFI Secure Boot
# (OVMF, shim, GRUB, Debian's kernel) with module.sig_enforce=1, from the initramfs's /init
# (busybox sh), and prints one line per check:
#   CHECK <name> PASS|FAIL <detail>
# Evidence lines start with "SMI| " (what vgpu-smi said) or "INFO ".
# The initramfs holds vgpu.ko three times: unsigned (installed as extra/vgpu.ko, what
# modprobe loads), signed with a key that is not enrolled (/root/sb/vgpu-not-enrolled.ko)
# and signed with the key enrolled as a Machine Owner Key (/root/sb/vgpu-signed.ko).
# The kernel command line sets (as environment variables):
#   VGPU_SB_CN     the enrolled key's subject CN
#   VGPU_SB_KEYID  its subject key identifier, lowercase hex (the kernel's key name)

cn=${VGPU_SB_CN:-}
keyid=${VGPU_SB_KEYID:-}
kver=$(uname -r)
installed=/lib/modules/$kver/extra/vgpu.ko

check() { # NAME PASS|FAIL DETAIL...
    name=$1
    verdict=$2
    shift 2
    echo "CHECK $name $verdict $*"
}
# The first line of a file, with the newline gone.
first() { head -n 1 "$1" 2>/dev/null | tr -d '\n'; }

stty -echo 2>/dev/null
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
modprobe efivarfs 2>/dev/null
mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null
echo "INFO kernel $kver, command line: $(cat /proc/cmdline)"

# 1. UEFI Secure Boot is on, the kernel is locked down and enforces module signatures;
# shim handed over its MOK list (the kernel's "MOKvar" EFI configuration table).
sb_var=/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c
# efivarfs: 4 bytes of attributes, then the value (1: on).
sb=$(od -A n -t u1 <"$sb_var" 2>/dev/null | awk '{ print $5 }')
lockdown=$(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/security/lockdown 2>/dev/null)
enforce=$(first /sys/module/module/parameters/sig_enforce)
said=$(dmesg | grep -o 'secureboot: Secure boot enabled' | head -n 1)
mokvar=$(dmesg | grep -o 'MOKvar=0x[0-9a-f]*' | head -n 1)
detail="SecureBoot=${sb:-?}, lockdown [${lockdown:-?}], module.sig_enforce=${enforce:-?}, kernel: '${said:-no Secure Boot message}', shim's ${mokvar:-MOKvar table missing}"
case $lockdown in integrity | confidentiality) locked=1 ;; *) locked=0 ;; esac
if [ "$sb" = 1 ] && [ $locked = 1 ] && [ "$enforce" = Y ] && [ -n "$said" ] && [ -n "$mokvar" ]; then
    check secure-boot PASS "$detail"
else
    check secure-boot FAIL "$detail"
fi

# 2. The enrolled key reached the kernel from shim's MokListRT and is a key it holds.
loaded=$(dmesg | grep -F "Loaded X.509 cert '$cn: $keyid'" | sed 's/^\[[^]]*\] //' | head -n 1)
source=$(dmesg | grep -B 1 -F "Loaded X.509 cert '$cn: $keyid'" | sed -n 's/.*Loading X.509 certificate: //p' | head -n 1)
key=$(grep -F " $cn: $keyid: X509" /proc/keys | head -n 1)
machine=$(grep -E ' keyring +\.machine: ' /proc/keys | sed 's/.* \.machine: /.machine: /')
if [ -n "$key" ]; then held="asymmetric key '$cn: $keyid'"; else held="no key '$cn: $keyid'"; fi
detail="kernel: '$loaded' from ${source:-?}; /proc/keys: $held; ${machine:-no .machine keyring}"
if [ -n "$cn" ] && [ -n "$keyid" ] && [ -n "$loaded" ] && [ -n "$key" ] &&
    echo "$source" | grep -q 'MokListRT'; then
    check mok-trusted PASS "$detail"
else
    check mok-trusted FAIL "$detail"
fi

# Tries modprobe vgpu with the module at $installed: sets rc, out (modprobe's words) and
# klog (what the kernel logged meanwhile).
try_modprobe() {
    dmesg -c >/dev/null
    out=$(modprobe vgpu 2>&1)
    rc=$?
    out=$(echo "$out" | tr '\n' ' ' | sed 's/ *$//')
    klog=$(dmesg | sed 's/^\[[^]]*\] //' | grep -v -E '^ |^(HOME|TERM)=' | tr '\n' ';' | sed 's/;$//')
}
# vgpu-smi's error when there is no device: sets smi_rc and smi (its output, one line).
try_smi() {
    smi=$(vgpu-smi 2>&1)
    smi_rc=$?
    echo "$smi" | sed 's/^/SMI| /'
    smi=$(echo "$smi" | tr '\n' ' ')
}
# A refused module: modprobe fails with EKEYREJECTED, the kernel says why (WHY), the module
# is not loaded and vgpu-smi's error says MUST (a grep -E pattern).
refused() { # CHECK WHAT WHY MUST
    try_modprobe
    if [ "$rc" -ne 0 ] && echo "$out" | grep -qF 'Key was rejected by service' &&
        echo "$klog" | grep -qF "$3" && [ ! -d /sys/module/vgpu ]; then
        check "$1" PASS "modprobe vgpu ($2): '$out'; kernel: '$klog'; /sys/module/vgpu absent"
    else
        check "$1" FAIL "modprobe vgpu ($2) exited $rc: '$out'; kernel: '$klog'"
    fi
    try_smi
    if [ "$smi_rc" -ne 0 ] && echo "$smi" | grep -qE "$4"; then
        check "$1-vgpu-smi" PASS "vgpu-smi exited $smi_rc and says why: $smi"
    else
        check "$1-vgpu-smi" FAIL "vgpu-smi exited $smi_rc: $smi"
    fi
}

# 3. The unsigned module is refused, and vgpu-smi says it is unsigned.
refused unsigned-refused "unsigned" 'Loading of unsigned module is rejected' \
    'is not signed and this kernel loads only signed modules'

# 4. A module signed with a key the kernel does not trust is refused too.
cp /root/sb/vgpu-not-enrolled.ko "$installed"
refused untrusted-key-refused "signed with a key not enrolled" \
    'Loading of module with unavailable key is rejected' 'is signed: .*enroll'

# 5. The module signed with the enrolled key loads, untainted by its signature, and its
# device appears.
cp /root/sb/vgpu-signed.ko "$installed"
try_modprobe
i=0
while [ ! -c /dev/vgpu0 ] && [ $i -lt 50 ]; do
    sleep 0.1
    i=$((i + 1))
done
taint=$(first /sys/module/vgpu/taint)
detail="modprobe vgpu exited $rc, said '$out'; /sys/module/vgpu/taint '$taint'; kernel: '$klog'"
if [ "$rc" -eq 0 ] && [ -d /sys/module/vgpu ] && ! echo "$taint" | grep -q E &&
    ! echo "$klog" | grep -qE 'verification failed|is rejected' && [ -c /dev/vgpu0 ]; then
    check signed-loads PASS "module signed by '$cn' loaded: $detail; /dev/vgpu0 is present"
else
    check signed-loads FAIL "$detail; /dev/vgpu0 $([ -c /dev/vgpu0 ] && echo present || echo missing)"
fi

# 6. The device works: vgpu-smi and vgpu-vector-add.
if vgpu-smi >/tmp/smi.out 2>&1; then
    sed 's/^/SMI| /' /tmp/smi.out
    check vgpu-smi PASS "$(first /tmp/smi.out)"
else
    sed 's/^/SMI| /' /tmp/smi.out
    check vgpu-smi FAIL "vgpu-smi failed: $(tail -n 1 /tmp/smi.out)"
fi
if vgpu-vector-add >/tmp/va.out 2>&1; then
    check vector-add PASS "$(tail -n 1 /tmp/va.out)"
else
    check vector-add FAIL "$(tail -n 1 /tmp/va.out)"
fi
echo "SB-GUEST-DONE"
