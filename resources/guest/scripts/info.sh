# Prints one line with what the tests check: CPUs online, memory, clock source, kernel.
mem=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
cs=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)
echo "GUEST-INFO nproc=$(nproc) mem_total_kib=$mem clocksource=$cs kernel=$(uname -r)"
