#!/bin/sh
# A small hardening baseline, as teams run on every golden image. Runs as the build user: root via sudo.
set -eu
echo "hardening: kernel parameters"
sudo tee /etc/sysctl.d/60-goldsmith-hardening.conf >/dev/null <<'CONF'
net.ipv4.conf.all.accept_redirects = 0
net.ipv4.conf.all.send_redirects = 0
net.ipv4.tcp_syncookies = 1
kernel.kptr_restrict = 2
CONF
echo "hardening: sshd without passwords or root login"
sudo install -d -m 0755 /etc/ssh/sshd_config.d
printf 'PasswordAuthentication no\nPermitRootLogin no\n' | sudo tee /etc/ssh/sshd_config.d/60-goldsmith.conf >/dev/null
echo "hardening: done"
